"""Renderers: flat-colour cartoon (``render_cartoon``) and photo-like (``render_photo``).

Both draw the shapes of :func:`geometry.layout` through the same affine pose, so
the cartoon of an identity is pixel-aligned ground truth for its photo.
"""

from __future__ import annotations

import math

import numpy as np

from .canvas import Canvas
from .geometry import affine, ellipse, layout
from .identity import Identity
from .photo import render_photo

__all__ = ["render_cartoon", "render_photo", "supersampling"]

OUTLINE = (44, 32, 30)
WHITE = (255, 255, 255)
BLUSH = (246, 120, 150)


def supersampling(size: int) -> int:
    """Internal render scale: 2x (then INTER_AREA downsampling) up to 256 px."""
    return 2 if size <= 256 else 1


def _scale(rgb, k: float):
    return tuple(min(255.0, c * k) for c in rgb)


def _mix(a, b, t: float):
    return tuple((1 - t) * x + t * y for x, y in zip(a, b, strict=True))


def render_cartoon(identity: Identity, size: int) -> np.ndarray:
    """Cartoon of ``identity``: uint8 (size, size, 3) RGB on a white background."""
    if size < 8:
        raise ValueError("size must be >= 8")
    ss = supersampling(size)
    lay = layout(identity)
    cv = Canvas(size * ss, affine(identity), WHITE)
    w = cv.width_px(0.0105, ss)  # main outline
    thin = cv.width_px(0.0065, ss)
    skin = _mix(identity.skin_tone, WHITE, 0.08)
    skin_dark = _scale(identity.skin_tone, 0.62)
    hair = identity.effective_hair_color
    hair_line = _mix(_scale(hair, 0.45), OUTLINE, 0.5)

    for poly in lay.hair_back:
        cv.paint(poly, _scale(hair, 0.88), hair_line, w)
    cv.paint(lay.neck, _scale(skin, 0.9), OUTLINE, w)
    cv.paint(lay.shirt, identity.shirt_color, OUTLINE, w)
    for ear in lay.ears:
        cv.paint(ear, skin, OUTLINE, w)
    cv.paint(lay.face, skin, OUTLINE, w)
    face_mask = cv.full_mask(lay.face)

    lv = identity.beard_level
    if lay.beard is not None:
        if lv >= 0.5:
            cv.paint(lay.beard, _scale(hair, 0.8), hair_line, w)
        else:
            cv.fill(lay.beard, _mix(skin, _scale(hair, 0.55), 0.3 + 0.5 * lv), clip=face_mask)
        _hatch(cv, lay, _mix(_scale(hair, 0.45), OUTLINE, 0.3), thin, 10 + int(30 * lv))
    if identity.blush_level > 0:
        rx, ry = lay.cheek_radii
        for cx, cy in lay.cheeks:
            cv.fill(ellipse(cx, cy, rx, ry), BLUSH, alpha=min(0.9, 0.95 * identity.blush_level))
            if identity.blush_level > 0.6:  # anime-style hatch strokes on the blush
                for k in (-1, 0, 1):
                    x = cx + k * 0.45 * rx
                    seg = np.array([[x + 0.25 * rx, cy - 0.45 * ry], [x - 0.25 * rx, cy + 0.45 * ry]])
                    cv.stroke(seg, _scale(BLUSH, 0.8), thin)
    for kind, pts in lay.wrinkles:
        cv.stroke(pts, skin_dark, thin if kind != "forehead" else w, alpha=0.9 if kind != "bag" else 0.6)

    cv.stroke(lay.nose_line[1:], skin_dark, thin)
    cv.stroke(lay.nose_line[:2], skin_dark, thin, alpha=0.7)
    cv.fill(lay.lower_lip, identity.lip_color)
    cv.fill(lay.upper_lip, _scale(identity.lip_color, 0.85))
    cv.stroke(lay.mouth_line, _mix(OUTLINE, identity.lip_color, 0.2), w)
    if lay.mustache is not None:
        cv.paint(lay.mustache, _scale(hair, 0.8), hair_line, thin)

    _eyes(cv, lay, identity, w, thin)
    brow = _mix(_scale(hair, 0.7), OUTLINE, 0.2 if identity.grey_amount < 0.5 else 0.0)
    for b in lay.brows:
        cv.fill(b, brow)

    for poly in lay.hair_front:
        cv.fill(poly, hair)
    hair_mask = np.zeros_like(face_mask)
    for poly in lay.hair_front:
        hair_mask = np.maximum(hair_mask, cv.full_mask(poly))
    for s in lay.hair_strands:
        cv.stroke(s, _scale(hair, 0.72), thin, clip=hair_mask)
    for poly in lay.hair_front:
        cv.stroke(poly, hair_line, w, closed=True)
    return cv.result(size)


def _eyes(cv: Canvas, lay, identity: Identity, w: int, thin: int) -> None:
    fem = identity.eyelashes
    lash_w = cv.width_px(0.0075, w // 2 or 1)
    for eye in lay.eyes:
        cx, cy = eye.center
        eye_mask = cv.full_mask(eye.outline)
        cv.fill(eye.outline, WHITE)
        r = 0.82 * eye.eh
        ix = cx + 0.12 * identity.pose_yaw * eye.ew
        cv.fill(ellipse(ix, cy + 0.08 * eye.eh, r, r * 1.05), identity.iris_color, clip=eye_mask)
        cv.fill(ellipse(ix, cy + 0.08 * eye.eh, 0.5 * r, 0.52 * r), (22, 18, 18), clip=eye_mask)
        cv.fill(ellipse(ix - 0.35 * r, cy - 0.3 * r, 0.3 * r, 0.3 * r), WHITE, clip=eye_mask)
        if fem or identity.group == "kids":  # bright big eyes: second highlight
            cv.fill(ellipse(ix + 0.4 * r, cy + 0.35 * r, 0.15 * r, 0.15 * r), WHITE, clip=eye_mask)
        lid_w = w + (cv.width_px(0.004, 1) if fem else 0)
        cv.stroke(eye.upper_lid, OUTLINE, lid_w)
        n = len(eye.outline)
        lower = eye.outline[n // 2 + 3 : n - 2]
        cv.stroke(lower, OUTLINE, thin, alpha=0.8)
        if fem:
            wing = eye.upper_lid[-1] + np.array([eye.side * 0.28 * eye.ew, -0.22 * eye.eh])
            cv.stroke(np.stack([eye.upper_lid[-4], eye.upper_lid[-1], wing]), OUTLINE, lid_w)
    for lash in lay.lashes:
        cv.stroke(lash, OUTLINE, lash_w)


def _hatch(cv: Canvas, lay, color, width: int, count: int) -> None:
    """Short diagonal strokes inside the beard region (deterministic positions)."""
    beard = lay.beard
    x0, y0 = beard.min(axis=0)
    x1, y1 = beard.max(axis=0)
    clip = cv.full_mask(beard)
    g = (math.sqrt(5) - 1) / 2
    mlen = 0.025 * lay.fh
    for k in range(count):
        u, v = (k * g) % 1.0, ((k + 0.5) / count)
        x, y = x0 + u * (x1 - x0), y0 + (0.35 + 0.65 * v) * (y1 - y0)
        seg = np.array([[x - 0.3 * mlen, y - mlen], [x + 0.3 * mlen, y + mlen]])
        cv.stroke(seg, color, width, alpha=0.85, clip=clip)
