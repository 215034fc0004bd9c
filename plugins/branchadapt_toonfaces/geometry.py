"""Shared face geometry: every shape both renderers draw, in canonical units.

Canonical units are fractions of the image side with the origin at the face
centre (x right, y down).  :func:`affine` maps them to normalised image
coordinates (0..1); the photo and the cartoon of an identity use the very same
shapes, which is what makes the cartoon a paired ground truth of the photo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .identity import Identity

FACE_CENTER = (0.5, 0.48)
_SHAPE_PARAMS = {  # (superellipse exponent top, bottom, jaw narrowing, chin power)
    "oval": (2.0, 2.0, 0.22, 2.0),
    "round": (2.0, 2.15, 0.08, 2.0),
    "square": (2.1, 3.0, 0.16, 2.5),
    "heart": (2.3, 2.0, 0.36, 1.5),
}


@dataclass(frozen=True)
class Eye:
    center: tuple[float, float]
    ew: float  # half-width
    eh: float  # half-height (upper lid)
    side: int  # +1 right eye in the image, -1 left; "outer" is +side
    outline: np.ndarray  # closed polygon
    upper_lid: np.ndarray  # polyline, inner to outer corner

    @property
    def top(self) -> float:
        return self.center[1] - self.eh


@dataclass
class Layout:
    identity: Identity
    fw: float
    fh: float
    face: np.ndarray
    eyes: tuple[Eye, Eye]
    brows: list[np.ndarray]
    brow_top: float  # smallest y of the brows near their middle
    lashes: list[np.ndarray]
    nose_line: np.ndarray
    nose_tip: tuple[float, float]
    nostrils: list[tuple[float, float]]
    nose_bottom: float
    mouth_line: np.ndarray
    upper_lip: np.ndarray
    lower_lip: np.ndarray
    mouth_y: float
    cheeks: list[tuple[float, float]]
    cheek_radii: tuple[float, float]
    ears: list[np.ndarray]
    neck: np.ndarray
    shirt: np.ndarray
    hair_back: list[np.ndarray]
    hair_front: list[np.ndarray]
    hair_strands: list[np.ndarray]
    hair_outer: tuple[float, float]  # radii of the outer hair ellipse
    hairline_y: float  # lowest hair y over the central forehead (-fh when bald)
    beard: np.ndarray | None
    mustache: np.ndarray | None
    wrinkles: list[tuple[str, np.ndarray]] = field(default_factory=list)


def affine(ident: Identity) -> np.ndarray:
    """2x3 matrix mapping canonical units to normalised image coordinates."""
    r = math.radians(ident.pose_roll)
    a, b = ident.pose_scale * math.cos(r), ident.pose_scale * math.sin(r)
    tx, ty = FACE_CENTER[0] + ident.pose_dx, FACE_CENTER[1] + ident.pose_dy
    return np.array([[a, -b, tx], [b, a, ty]], dtype=np.float64)


def canonical_grid(ident: Identity, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (x, y) of every pixel centre of a ``size`` x ``size`` image."""
    m = affine(ident)
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    u, v = np.meshgrid(c, c)
    x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    return x.astype(np.float32), y.astype(np.float32)


def ellipse(cx: float, cy: float, rx: float, ry: float, a0=0.0, a1=2 * math.pi, n=48) -> np.ndarray:
    t = np.linspace(a0, a1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _face_outline(ident: Identity, n: int = 96) -> np.ndarray:
    fw, fh = ident.face_width, ident.face_height
    n_top, n_bot, jaw, chin_pow = _SHAPE_PARAMS[ident.face_shape]
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)  # 0 = top, clockwise
    s, c = np.sin(t), np.cos(t)
    expo = np.where(c > 0, 2.0 / n_top, 2.0 / n_bot)
    x = fw * np.sign(s) * np.abs(s) ** expo
    y = -fh * np.sign(c) * np.abs(c) ** expo
    x = x * (1.0 - jaw * np.clip(y / fh, 0.0, 1.0) ** chin_pow)
    return np.stack([x, y], axis=1)


def face_half_width(face: np.ndarray, y) -> np.ndarray:
    right = face[face[:, 0] >= 0]
    order = np.argsort(right[:, 1])
    return np.interp(y, right[order, 1], right[order, 0])


def _stroke_poly(center: np.ndarray, widths: np.ndarray) -> np.ndarray:
    d = np.gradient(center, axis=0)
    nrm = np.stack([-d[:, 1], d[:, 0]], axis=1)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True) + 1e-12
    off = nrm * (widths[:, None] / 2.0)
    return np.concatenate([center + off, (center - off)[::-1]])


def _eye(ident: Identity, side: int, cx: float, cy: float) -> Eye:
    ew = ident.eye_size * ident.face_width
    eh = 0.62 * ew
    t = np.linspace(-1.0, 1.0, 25)
    lift = 0.12 * eh * t * side  # outer corner slightly higher
    upper = np.stack([cx + ew * t, cy - eh * np.sqrt(1 - t**2) ** 0.9 - lift], axis=1)
    lower = np.stack([cx + ew * t, cy + 0.72 * eh * np.sqrt(1 - t**2) - lift], axis=1)
    outline = np.concatenate([upper, lower[::-1][1:-1]])
    lid = upper if side > 0 else upper[::-1]  # inner -> outer corner
    return Eye((cx, cy), ew, eh, side, outline, lid)


def _lashes(eye: Eye) -> list[np.ndarray]:
    out = []
    lid = eye.upper_lid
    for k, f in enumerate(np.linspace(0.45, 1.0, 6)):
        i = min(len(lid) - 1, round(f * (len(lid) - 1)))
        base = lid[i]
        ang = math.radians(8 + 62 * (f - 0.45) / 0.55)
        length = eye.ew * (0.55 + 0.35 * (f - 0.45) / 0.55 + 0.04 * (k % 2))
        d = np.array([eye.side * math.sin(ang), -math.cos(ang)])
        bend = np.array([eye.side * 0.18, 0.0]) * length
        out.append(np.stack([base, base + 0.55 * length * d, base + length * d + bend]))
    return out


def _brow(ident: Identity, eye: Eye, fh: float) -> np.ndarray:
    th = ident.brow_thickness * fh
    s = np.linspace(0.0, 1.0, 16)
    x = eye.center[0] + eye.side * eye.ew * (-0.95 + 2.15 * s)
    base = eye.top - 0.95 * eye.ew - th / 2
    y = base - 0.25 * eye.ew * np.sin(math.pi * s**0.8) - 0.2 * eye.ew * ident.brow_tilt * s
    taper = 0.5 if ident.group in ("women", "kids") else 0.25
    return _stroke_poly(np.stack([x, y], axis=1), th * (1.0 - taper * s**1.5))


def _hairline(ident: Identity, x: np.ndarray, fw: float, fh: float) -> np.ndarray:
    u = x / fw
    if ident.hair_style in ("long", "bob"):
        base, rec, wig = -0.6, 0.10, 0.02
    elif ident.hair_style == "short":
        base, rec, wig = -0.64, 0.18 + 0.2 * ident.wrinkle_level, 0.0
    else:
        base, rec, wig = -0.7, 0.2 + 0.2 * ident.wrinkle_level, 0.0
    base -= 0.1 * ident.wrinkle_level  # receding hair line with age
    return fh * (base - rec * u**2 + 0.07 * ident.hair_part * u + wig * np.sin(9.0 * u))


def _hair(ident: Identity, face: np.ndarray, eye_y: float, mouth_y: float, fw: float, fh: float):
    vol = ident.hair_volume if ident.hair_style != "buzz" else min(ident.hair_volume, 0.08)
    rx, ry = fw * (1.04 + 0.45 * vol), fh * (1.0 + vol)
    back: list[np.ndarray] = []
    front: list[np.ndarray] = []
    style = ident.hair_style
    xs = np.linspace(0.82 * fw, -0.82 * fw, 33)
    hl = np.stack([xs, _hairline(ident, xs, fw, fh)], axis=1)
    lim = 0.9 * face_half_width(face, hl[:, 1])  # keep the hair line inside the face
    hl[:, 0] = np.clip(hl[:, 0], -lim, lim)
    if style in ("short", "buzz"):
        y_sb = eye_y + (0.02 if style == "short" else -0.1) * fh
        a = math.asin(min(0.95, y_sb / ry))
        outer = ellipse(0, 0, rx, ry, math.pi - a, 2 * math.pi + a, 40)
        xsb = face_half_width(face, y_sb)
        ys = np.linspace(y_sb, hl[0, 1] + 0.04 * fh, 8)
        inner = np.stack([0.9 * face_half_width(face, ys), ys], axis=1)
        inner[0, 0] = 0.9 * xsb
        inner_l = inner[::-1] * [-1, 1]
        front.append(np.concatenate([outer, inner, hl, inner_l]))
    elif style in ("long", "bob"):
        y_b = mouth_y if style == "bob" else fh * 1.02
        y_back = mouth_y + 0.02 if style == "bob" else fh + (0.1 if ident.group == "kids" else 0.16)
        top = ellipse(0, 0, rx, ry, math.pi, 2 * math.pi, 40)
        flare = 1.0 if style == "bob" else 1.1
        yb2 = y_back - 0.03
        tail = [[rx * flare, yb2], [0.8 * rx, y_back], [0.3 * rx, y_back + 0.01]]
        tail = tail + [[-x, y] for x, y in tail[::-1]]
        back.append(np.concatenate([top, tail]))
        ys = np.linspace(y_b, hl[0, 1] + 0.04 * fh, 12)
        side_in = np.stack([0.93 * face_half_width(face, ys), ys], axis=1)
        outer_r = np.array([[rx * (1.0 + 0.5 * (flare - 1)), y_b]])
        front.append(np.concatenate([top, outer_r, side_in, hl, side_in[::-1] * [-1, 1], outer_r * [-1, 1]]))
    else:  # balding: tufts above the ears only
        for sd in (-1, 1):
            ys = np.linspace(-0.55 * fh, eye_y + 0.05 * fh, 10)
            hw = face_half_width(face, ys)
            bulge = 0.035 * fw + 0.02 * np.sin(np.linspace(0, math.pi, 10))
            outer = np.stack([sd * (hw + bulge), ys], axis=1)
            inner = np.stack([sd * 0.9 * hw, ys], axis=1)[::-1]
            front.append(np.concatenate([outer, inner]))
        hl = np.array([[0.0, -fh]])
    strands = []
    if style != "balding":
        for k in (-0.45, 0.0, 0.45):
            x0 = (k + 0.15 * ident.hair_part) * fw
            strands.append(np.array([[x0 * 0.6, -ry * 0.95], [x0 * 0.9, -fh * 0.95], [x0 * 1.15, -0.7 * fh]]))
    mid = np.abs(hl[:, 0]) <= 0.5 * fw
    hairline_y = float(hl[mid, 1].max()) if style != "balding" else -fh
    return back, front, strands, (rx, ry), hairline_y


def _beard(ident: Identity, face: np.ndarray, eye_y: float, nb: float, mw: float, fw: float, fh: float):
    if ident.beard_level <= 0.0:
        return None, None
    y_s = eye_y + 0.12 * fh
    low = face[face[:, 1] >= y_s]
    low = low[np.argsort(-np.arctan2(low[:, 0], low[:, 1]))]  # right -> chin -> left
    grow = max(0.0, ident.beard_level - 0.5) * 0.16 * fh
    low = low + np.stack([np.zeros(len(low)), grow * np.clip(low[:, 1] / fh, 0, 1) ** 3], axis=1)
    xr = face_half_width(face, y_s)
    inner_r = np.array([[0.97 * xr, y_s], [0.62 * fw, nb + 0.02 * fh], [mw + 0.03 * fw, nb + 0.06 * fh]])
    center = [[0.0, nb + 0.04 * fh]]
    beard = np.concatenate([low, inner_r * [-1, 1], center, inner_r[::-1]])
    must = None
    if ident.beard_level >= 0.45:
        must = np.array(
            [
                [-mw * 1.1, nb + 0.22 * fh],
                [-mw * 0.8, nb + 0.07 * fh],
                [-0.1 * fw, nb + 0.04 * fh],
                [0.1 * fw, nb + 0.04 * fh],
                [mw * 0.8, nb + 0.07 * fh],
                [mw * 1.1, nb + 0.22 * fh],
                [mw * 0.7, nb + 0.13 * fh],
                [0.0, nb + 0.11 * fh],
                [-mw * 0.7, nb + 0.13 * fh],
            ]
        )
    return beard, must


def _wrinkles(ident: Identity, lay_eyes, brow_top, hairline_y, nb, mouth_y, mw, nw, fw, fh):
    lv = ident.wrinkle_level
    if lv <= 0.0:
        return []
    out: list[tuple[str, np.ndarray]] = []
    lo = brow_top - 0.07 * fh
    hi = max(hairline_y + 0.06 * fh, brow_top - 0.45 * fh)
    n = min(2 + int(lv > 0.5) + int(lv > 0.85), 1 + int((lo - hi) / (0.085 * fh)))
    for k, yk in enumerate(np.linspace(lo, hi, n)):
        half = (0.42 - 0.05 * k) * fw * (0.8 + 0.25 * lv)
        x = np.linspace(-half, half, 15)
        y = yk + 0.018 * fh * np.cos(math.pi * x / half) + 0.008 * fh * np.sin(7 * x / fw + k)
        out.append(("forehead", np.stack([x, y], axis=1)))
    for eye in lay_eyes:
        (cx, cy), s = eye.center, eye.side
        for ang in (-28.0, 0.0, 28.0):
            a = math.radians(ang)
            p0 = np.array([cx + s * 1.12 * eye.ew, cy - 0.1 * eye.eh])
            d = np.array([s * math.cos(a), math.sin(a)])
            out.append(("crow", np.stack([p0, p0 + 0.45 * eye.ew * d])))
        out.append(
            ("bag", ellipse(cx, cy + 0.35 * eye.eh, 0.7 * eye.ew, eye.eh, 0.25 * math.pi, 0.75 * math.pi, 9))
        )
    for s in (-1, 1):
        pts = np.array(
            [
                [s * (nw + 0.1 * fw), nb - 0.05 * fh],
                [s * (mw + 0.1 * fw), (nb + mouth_y) / 2],
                [s * (mw + 0.08 * fw), mouth_y + 0.06 * fh],
            ]
        )
        out.append(("fold", pts))
    return out


def layout(ident: Identity) -> Layout:
    """All shapes of an identity in canonical units."""
    fw, fh = ident.face_width, ident.face_height
    face = _face_outline(ident)
    eye_y = ident.eye_height * fh
    yaw = ident.pose_yaw
    ex = ident.eye_spacing * fw
    eyes = (_eye(ident, -1, -ex + 0.05 * yaw * fw, eye_y), _eye(ident, 1, ex + 0.05 * yaw * fw, eye_y))
    brows = [_brow(ident, e, fh) for e in eyes]
    mids = [b[4:12] for b in brows]
    brow_top = float(min(m[:, 1].min() for m in mids))
    lashes = [lash for e in eyes for lash in _lashes(e)] if ident.eyelashes else []
    nb = eye_y + ident.nose_length * fh
    nw = ident.nose_width * fw
    tip = (0.1 * yaw * fw, nb - 0.02 * fh)
    shade = 1 if ident.light_dir[0] < 0 else -1  # side stroke away from the light
    nose_line = np.array(
        [
            [tip[0] + shade * 0.35 * nw, nb - 0.55 * ident.nose_length * fh],
            [tip[0] + shade * 0.75 * nw, nb - 0.06 * fh],
            [tip[0] + shade * 0.45 * nw, nb],
            [tip[0], nb + 0.015 * fh],
            [tip[0] - shade * 0.45 * nw, nb],
        ]
    )
    nostrils = [(tip[0] - 0.45 * nw, nb - 0.005 * fh), (tip[0] + 0.45 * nw, nb - 0.005 * fh)]
    mouth_y = nb + (fh - nb) * 0.4
    mw = ident.mouth_width * fw
    mx = 0.06 * yaw * fw
    t = np.linspace(-1.0, 1.0, 21)
    c = ident.mouth_curve
    line = np.stack([mx + mw * t, mouth_y - c * 0.22 * mw * (t**2 - 0.4)], axis=1)
    lip = (0.5 if ident.group == "women" else 0.36) * mw
    bow = 1.0 - 0.35 * np.exp(-((t / 0.18) ** 2))
    upper = np.concatenate([line, (line - [0.0, 0.0])[::-1]])
    upper[len(t) :, 1] -= (0.55 * lip * np.sqrt(1 - t**2) * bow)[::-1]
    lower = np.concatenate([line, line[::-1]])
    lower[len(t) :, 1] += (0.8 * lip * np.sqrt(1 - t**2))[::-1]
    cheek_y = eye_y + eyes[0].eh + 0.3 * ident.nose_length * fh + 0.05 * fh
    cheeks = [(-0.56 * fw, cheek_y), (0.56 * fw, cheek_y)]
    ears = []
    if ident.hair_style not in ("long", "bob"):
        ey, ry = eye_y + 0.45 * ident.nose_length * fh, 0.5 * ident.nose_length * fh + 0.06 * fh
        ears = [ellipse(s * face_half_width(face, ey) * 0.98, ey, 0.15 * fw, ry) for s in (-1, 1)]
    nk = (0.5 if ident.group == "men" else 0.44) * fw
    neck = np.array([[-nk, 0.3 * fh], [nk, 0.3 * fh], [nk * 1.05, fh + 0.2], [-nk * 1.05, fh + 0.2]])
    y0 = fh + 0.075
    shirt = np.array(
        [
            [-nk * 1.15, y0],
            [0.0, y0 + 0.07],
            [nk * 1.15, y0],
            [1.4 * fw, y0 + 0.03],
            [2.2 * fw, y0 + 0.08],
            [2.7 * fw, y0 + 0.2],
            [2.8 * fw, 0.8],
            [-2.8 * fw, 0.8],
            [-2.7 * fw, y0 + 0.2],
            [-2.2 * fw, y0 + 0.08],
            [-1.4 * fw, y0 + 0.03],
        ]
    )
    back, front, strands, outer, hairline_y = _hair(ident, face, eye_y, mouth_y, fw, fh)
    beard, must = _beard(ident, face, eye_y, nb, mw, fw, fh)
    wr = _wrinkles(ident, eyes, brow_top, hairline_y, nb, mouth_y, mw, nw, fw, fh)
    return Layout(
        identity=ident,
        fw=fw,
        fh=fh,
        face=face,
        eyes=eyes,
        brows=brows,
        brow_top=brow_top,
        lashes=lashes,
        nose_line=nose_line,
        nose_tip=tip,
        nostrils=nostrils,
        nose_bottom=nb,
        mouth_line=line,
        upper_lip=upper,
        lower_lip=lower,
        mouth_y=mouth_y,
        cheeks=cheeks,
        cheek_radii=(0.19 * fw, 0.11 * fh),
        ears=ears,
        neck=neck,
        shirt=shirt,
        hair_back=back,
        hair_front=front,
        hair_strands=strands,
        hair_outer=outer,
        hairline_y=hairline_y,
        beard=beard,
        mustache=must,
        wrinkles=wr,
    )
