"""Identity parameters of a procedural face and their group-typical sampling.

All lengths are in *canonical units*: fractions of the image side, measured from
the face centre (x to the right, y downwards).  Relative quantities (eye size,
nose length, ...) are fractions of the face half-width ``face_width`` (x) or
half-height ``face_height`` (y) as documented per field.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUPS: tuple[str, ...] = ("women", "men", "kids", "elderly")
FACE_SHAPES: tuple[str, ...] = ("oval", "round", "square", "heart")
HAIR_STYLES: tuple[str, ...] = ("long", "bob", "short", "buzz", "balding")

RGB = tuple[int, int, int]

_SKIN_TONES: tuple[RGB, ...] = (
    (250, 222, 198),
    (241, 200, 170),
    (226, 177, 142),
    (200, 142, 106),
    (165, 110, 78),
    (118, 78, 56),
)
_YOUNG_HAIR: tuple[RGB, ...] = (
    (34, 28, 28),  # black
    (66, 44, 30),  # dark brown
    (108, 70, 42),  # brown
    (136, 66, 36),  # auburn
    (196, 156, 88),  # blond
    (146, 102, 62),  # light brown
)
_ELDER_BASE_HAIR: tuple[RGB, ...] = _YOUNG_HAIR[:3]
_IRIS: tuple[RGB, ...] = ((92, 58, 36), (60, 40, 28), (70, 110, 150), (80, 110, 70), (120, 90, 50))
_SHIRTS: tuple[RGB, ...] = (
    (52, 72, 120),
    (150, 40, 50),
    (40, 100, 80),
    (70, 70, 78),
    (180, 130, 60),
    (100, 60, 120),
    (30, 30, 36),
)
GREY_TARGET: RGB = (212, 212, 216)


@dataclass(frozen=True)
class Identity:
    """Everything needed to render one person as a photo or as a cartoon."""

    group: str
    # face outline
    face_shape: str
    face_width: float  # half-width, canonical units
    face_height: float  # half-height, canonical units
    skin_tone: RGB
    # hair
    hair_style: str
    hair_color: RGB  # base colour before greying
    hair_volume: float  # hair thickness above the head, fraction of face_height
    hair_part: float  # -1..1, asymmetry of the hair line / fringe
    # eyes and brows
    eye_size: float  # eye half-width / face_width
    eye_spacing: float  # eye centre |x| / face_width
    eye_height: float  # eye centre y / face_height (0 = face centre)
    iris_color: RGB
    brow_thickness: float  # fraction of face_height
    brow_tilt: float  # -1..1, raise of the outer brow end
    # nose and mouth
    nose_length: float  # eye line to nose bottom, fraction of face_height
    nose_width: float  # nose half-width / face_width
    mouth_width: float  # mouth half-width / face_width
    mouth_curve: float  # -0.3 (frown) .. 1 (smile)
    lip_color: RGB
    # pose jitter
    pose_dx: float  # translation, canonical units
    pose_dy: float
    pose_yaw: float  # -1..1, horizontal shift of the inner features
    pose_roll: float  # degrees
    pose_scale: float
    # photo conditions
    background: RGB
    light_dir: tuple[float, float, float]  # unit vector, z towards the camera
    shirt_color: RGB
    # group traits
    eyelashes: bool
    beard_level: float  # 0 none, <0.5 stubble, >=0.5 beard
    blush_level: float  # 0..1
    wrinkle_level: float  # 0..1
    grey_amount: float  # 0..1 mix of the hair colour towards grey/white

    @property
    def effective_hair_color(self) -> RGB:
        """Hair colour after greying."""
        return mix_rgb(self.hair_color, GREY_TARGET, self.grey_amount)


def mix_rgb(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(round((1.0 - t) * x + t * y) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; valid groups: {', '.join(GROUPS)}")


def _jitter(rng: np.random.Generator, rgb: RGB, amount: float) -> RGB:
    noise = rng.normal(0.0, amount, 3) + rng.normal(0.0, amount)
    return tuple(int(np.clip(round(c + n), 0, 255)) for c, n in zip(rgb, noise, strict=True))  # type: ignore[return-value]


def _pick(rng: np.random.Generator, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def _background(rng: np.random.Generator) -> RGB:
    hue = rng.uniform(0.0, 6.0)
    sat = rng.uniform(0.04, 0.18)
    val = rng.uniform(212.0, 240.0)
    k = np.array([5.0, 3.0, 1.0])
    chan = val * (1.0 - sat * np.clip(np.minimum((k + hue) % 6.0, 4.0 - (k + hue) % 6.0), 0.0, 1.0))
    return tuple(round(c) for c in chan)  # type: ignore[return-value]


def _light(rng: np.random.Generator) -> tuple[float, float, float]:
    v = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.15), rng.uniform(0.7, 1.1)])
    v /= np.linalg.norm(v)
    return (float(v[0]), float(v[1]), float(v[2]))


# Per-group ranges.  Each entry is (low, high) for a uniform draw.
_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "women": dict(
        fw=(0.190, 0.210),
        ratio=(0.73, 0.79),
        eye=(0.25, 0.29),
        eyey=(-0.02, 0.05),
        brow=(0.034, 0.044),
        nose=(0.32, 0.38),
        nosew=(0.17, 0.21),
        mouth=(0.30, 0.36),
        smile=(0.1, 1.0),
        blush=(0.0, 0.2),
        wrinkle=(0.0, 0.0),
        grey=(0.0, 0.0),
        vol=(0.16, 0.26),
    ),
    "men": dict(
        fw=(0.200, 0.222),
        ratio=(0.74, 0.80),
        eye=(0.20, 0.235),
        eyey=(-0.02, 0.05),
        brow=(0.052, 0.068),
        nose=(0.35, 0.42),
        nosew=(0.21, 0.26),
        mouth=(0.32, 0.40),
        smile=(-0.2, 0.7),
        blush=(0.0, 0.0),
        wrinkle=(0.0, 0.0),
        grey=(0.0, 0.0),
        vol=(0.08, 0.16),
    ),
    "kids": dict(
        fw=(0.205, 0.228),
        ratio=(0.87, 0.93),
        eye=(0.28, 0.32),
        eyey=(0.13, 0.19),
        brow=(0.032, 0.040),
        nose=(0.20, 0.25),
        nosew=(0.13, 0.16),
        mouth=(0.24, 0.30),
        smile=(0.3, 1.0),
        blush=(0.75, 1.0),
        wrinkle=(0.0, 0.0),
        grey=(0.0, 0.0),
        vol=(0.12, 0.22),
    ),
    "elderly": dict(
        fw=(0.195, 0.218),
        ratio=(0.74, 0.80),
        eye=(0.20, 0.23),
        eyey=(0.0, 0.06),
        brow=(0.042, 0.058),
        nose=(0.36, 0.43),
        nosew=(0.20, 0.25),
        mouth=(0.28, 0.35),
        smile=(-0.2, 0.6),
        blush=(0.0, 0.1),
        wrinkle=(0.6, 1.0),
        grey=(0.75, 1.0),
        vol=(0.08, 0.16),
    ),
}

_STYLES: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "women": (("long", "bob"), (0.6, 0.4)),
    "men": (("short", "buzz"), (0.65, 0.35)),
    "kids": (("bob", "short", "long"), (0.4, 0.35, 0.25)),
    "elderly": (("short", "balding", "bob"), (0.45, 0.35, 0.2)),
}
_SHAPES: dict[str, tuple[float, ...]] = {
    # probabilities over FACE_SHAPES (oval, round, square, heart)
    "women": (0.5, 0.15, 0.05, 0.3),
    "men": (0.4, 0.1, 0.5, 0.0),
    "kids": (0.1, 0.9, 0.0, 0.0),
    "elderly": (0.5, 0.2, 0.3, 0.0),
}


def sample_identity(group: str, rng: np.random.Generator) -> Identity:
    """Draw a group-typical identity.  Deterministic for a given ``rng`` state."""
    _check_group(group)
    r = _RANGES[group]

    def u(key: str) -> float:
        lo, hi = r[key]
        return float(rng.uniform(lo, hi))

    styles, style_p = _STYLES[group]
    style = str(_pick(rng, styles, style_p))
    shape = str(_pick(rng, FACE_SHAPES, _SHAPES[group]))
    fw = u("fw")
    fh = fw / u("ratio")
    if group == "elderly":
        hair = _jitter(rng, _pick(rng, _ELDER_BASE_HAIR), 8.0)
        grey_target_jitter = u("grey")
    else:
        hair = _jitter(rng, _pick(rng, _YOUNG_HAIR), 8.0)
        grey_target_jitter = 0.0
    beard = 0.0
    if group == "men":
        beard = float(rng.uniform(0.2, 1.0))
    elif group == "elderly" and style != "bob" and rng.random() < 0.35:
        beard = float(rng.uniform(0.2, 0.7))
    lip_base = (200, 92, 100) if group == "women" else (178, 110, 105)
    return Identity(
        group=group,
        face_shape=shape,
        face_width=fw,
        face_height=fh,
        skin_tone=_jitter(rng, _pick(rng, _SKIN_TONES), 5.0),
        hair_style=style,
        hair_color=hair,
        hair_volume=u("vol"),
        hair_part=float(rng.uniform(-1.0, 1.0)),
        eye_size=u("eye"),
        eye_spacing=float(rng.uniform(0.45, 0.50)),
        eye_height=u("eyey"),
        iris_color=_jitter(rng, _pick(rng, _IRIS), 6.0),
        brow_thickness=u("brow"),
        brow_tilt=float(rng.uniform(-0.3, 1.0)),
        nose_length=u("nose"),
        nose_width=u("nosew"),
        mouth_width=u("mouth"),
        mouth_curve=u("smile"),
        lip_color=_jitter(rng, lip_base, 8.0),
        pose_dx=float(rng.uniform(-0.025, 0.025)),
        pose_dy=float(rng.uniform(-0.015, 0.015)),
        pose_yaw=float(rng.uniform(-1.0, 1.0)),
        pose_roll=float(rng.uniform(-7.0, 7.0)),
        pose_scale=float(rng.uniform(1.04, 1.16)),
        background=_background(rng),
        light_dir=_light(rng),
        shirt_color=_jitter(rng, _pick(rng, _SHIRTS), 10.0),
        eyelashes=group == "women",
        beard_level=beard,
        blush_level=u("blush"),
        wrinkle_level=u("wrinkle"),
        grey_amount=grey_target_jitter,
    )
