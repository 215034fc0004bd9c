"""Photo-like rendering of an identity: shading, soft features, texture, noise.

Uses the same shapes as the cartoon (:mod:`geometry`), but composes them with
soft (blurred) masks, Lambert shading of an ellipsoid head lit from
``identity.light_dir``, skin/hair texture, a light varied background (as in
segmented portrait photos) and camera noise.  Group traits are subtle here.
"""

from __future__ import annotations

import cv2
import numpy as np

from .canvas import Canvas
from .geometry import affine, canonical_grid, ellipse, layout
from .identity import Identity


def _noise(rng: np.random.Generator, n: int, sigma: float, amp: float) -> np.ndarray:
    z = rng.standard_normal((n, n), dtype=np.float32)
    if sigma > 0:
        z = cv2.GaussianBlur(z, (0, 0), sigma)
        z *= 1.0 / (z.std() + 1e-6)
    return z * amp


def _lowfreq(rng: np.random.Generator, n: int, cells: int, amp: float) -> np.ndarray:
    z = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(z, (n, n), interpolation=cv2.INTER_CUBIC) * amp


def _lambert(x, y, rx, ry, light) -> np.ndarray:
    nx, ny = x / rx, y / ry
    nz = np.sqrt(np.clip(1.0 - nx * nx - ny * ny, 0.02, 1.0))
    norm = np.sqrt(nx * nx + ny * ny + nz * nz)
    return np.clip((nx * light[0] + ny * light[1] + nz * light[2]) / norm, 0.0, 1.0)


def _comp(cv: Canvas, poly: np.ndarray, layer: np.ndarray, blur: float) -> None:
    """Composite a per-pixel colour layer inside a soft polygon (bounding box only)."""
    roi, m = cv.mask(poly, blur=blur)
    if roi is not None:
        cv.blend(roi, m, layer)


def render_photo(identity: Identity, size: int, rng: np.random.Generator) -> np.ndarray:
    """Photo-like rendering: uint8 (size, size, 3) RGB.  ``rng`` drives noise/texture only."""
    if size < 8:
        raise ValueError("size must be >= 8")
    ss = 2 if size < 96 else 1  # everything is soft anyway: no supersampling needed above 96 px
    n = size * ss
    lay = layout(identity)
    fw, fh = lay.fw, lay.fh
    light = identity.light_dir
    X, Y = canonical_grid(identity, n)

    # background: light gradient + low-frequency blotches
    ang = rng.uniform(0, 2 * np.pi)
    u = (np.arange(n, dtype=np.float32) / n - 0.5)[None, :]
    v = (np.arange(n, dtype=np.float32) / n - 0.5)[:, None]
    grad = (np.cos(ang) * u + np.sin(ang) * v) * rng.uniform(18, 34)
    bg = np.asarray(identity.background, np.float32) + (grad + _lowfreq(rng, n, 5, 5.0))[..., None]
    cv = Canvas(n, affine(identity), bg)
    img = cv.img
    px = 1.0 / (cv.unit / ss)  # one output pixel in canonical units
    soft = 0.8 * ss  # outline softness in render pixels

    shade_head = 0.58 + 0.5 * _lambert(X, Y + 0.1 * fh, 1.2 * fw, 1.25 * fh, light)
    skin = np.asarray(identity.skin_tone, np.float32)
    tex = 1.0 + _noise(rng, n, 0.7 * ss, 0.022) + _noise(rng, n, 4.0 * ss, 0.018)
    skin_layer = skin * (shade_head * tex)[..., None]
    rx, ry = lay.hair_outer
    hair = np.asarray(identity.effective_hair_color, np.float32)
    strands = cv2.blur(rng.standard_normal((n, n), dtype=np.float32), (1, max(3, 5 * ss)))
    hair_tex = 1.0 + 0.32 * strands + _noise(rng, n, 3.0 * ss, 0.05)
    hair_shade = 0.5 + 0.65 * _lambert(X, Y, rx * 1.1, ry * 1.1, light)
    hair_layer = hair * (hair_shade * hair_tex)[..., None] + 10.0 * (hair_shade > 1.0)[..., None]

    # body: shirt with soft folds, neck darkened under the chin
    shirt = np.asarray(identity.shirt_color, np.float32)
    folds = 0.85 + 0.15 * np.tanh(_lowfreq(rng, n, 6, 1.5)) + 0.1 * light[0] * np.sign(X)
    for poly in lay.hair_back:
        _comp(cv, poly, hair_layer * 0.82, soft)
    neck_shade = 0.68 + 0.25 * np.clip((Y - fh) / 0.1, 0, 1)
    _comp(cv, lay.neck, skin_layer * neck_shade[..., None], soft)
    _comp(cv, lay.shirt, shirt * folds[..., None], soft)
    for ear in lay.ears:
        _comp(cv, ear, skin_layer * 0.9, soft)
    # rim darkening: the head turns away from the camera near its silhouette
    rim = cv2.GaussianBlur(cv.full_mask(lay.face), (0, 0), 0.035 * fw * cv.unit)
    rim = 0.7 + 0.3 * np.clip(2.2 * rim - 1.0, 0.0, 1.0)
    _comp(cv, lay.face, skin_layer * rim[..., None], soft)

    # beard / stubble: dark hair dots and texture
    if lay.beard is not None:
        lv = identity.beard_level
        bm = cv.full_mask(lay.beard, blur=1.5 * ss)
        dots = (rng.random((n, n), dtype=np.float32) < 0.18 + 0.5 * lv).astype(np.float32)
        dots = cv2.GaussianBlur(dots, (0, 0), 0.5 * ss)
        alpha = bm * np.clip(0.25 + 0.8 * lv, 0, 1) * (0.45 + 0.55 * dots if lv < 0.5 else 0.95)
        img += alpha[..., None] * (hair_layer * (0.5 if lv < 0.5 else 0.8) - img)

    # cheek redness (subtle blush) and ambient occlusion around the eyes
    if identity.blush_level > 0:
        for cx, cy in lay.cheeks:
            e = ellipse(cx, cy, 1.2 * lay.cheek_radii[0], 1.3 * lay.cheek_radii[1])
            cv.fill(e, (214, 92, 98), alpha=0.4 * identity.blush_level, blur=0.05 * cv.unit * fw)
    for eye in lay.eyes:
        (cx, cy), ew, eh = eye.center, eye.ew, eye.eh
        cv.fill(
            ellipse(cx, cy - 0.3 * eh, 1.3 * ew, 1.6 * eh), skin * 0.62, alpha=0.45, blur=0.5 * ew * cv.unit
        )
    for kind, pts in lay.wrinkles:
        a = (0.3 if kind != "forehead" else 0.38) * identity.wrinkle_level
        cv.stroke(pts, skin * 0.5, cv.width_px(0.6 * px, 1), alpha=a, blur=0.6 * ss)

    # nose: side shadow, nostrils, tip highlight
    shade_side = lay.nose_line[:3]
    cv.stroke(shade_side, skin * 0.55, cv.width_px(0.05 * fw, 1), alpha=0.35, blur=0.04 * fw * cv.unit)
    for nx, ny in lay.nostrils:
        cv.fill(
            ellipse(nx, ny, 0.1 * fw * identity.nose_width / 0.2, 0.025 * fh), skin * 0.35, 0.7, blur=0.8 * ss
        )
    tx, ty = lay.nose_tip
    cv.fill(
        ellipse(tx + 0.02 * fw * light[0], ty - 0.02 * fh, 0.06 * fw, 0.04 * fh),
        (255, 245, 235),
        0.18,
        blur=2 * ss,
    )

    # mouth
    lip = np.asarray(identity.lip_color, np.float32)
    cv.fill(lay.lower_lip, lip * 0.95, alpha=0.85, blur=0.6 * ss)
    cv.fill(lay.upper_lip, lip * 0.78, alpha=0.85, blur=0.6 * ss)
    cv.stroke(lay.mouth_line, lip * 0.35, cv.width_px(0.8 * px, 1), alpha=0.8, blur=0.4 * ss)

    _photo_eyes(cv, lay, identity, px, ss)
    for b in lay.brows:
        cv.fill(b, hair * 0.7, alpha=0.8, blur=0.7 * ss)

    for poly in lay.hair_front:
        _comp(cv, poly, hair_layer, soft)

    img = cv2.GaussianBlur(cv.img, (0, 0), 0.45 * ss)
    if ss != 1:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    gain = np.asarray(rng.uniform(0.96, 1.04, 3), np.float32)  # white balance
    noise_sigma = rng.uniform(2.5, 4.5)
    img = img * gain + rng.normal(0.0, noise_sigma, (size, size, 3)).astype(np.float32)
    img += rng.normal(0.0, noise_sigma * 0.6, (size, size, 1)).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _photo_eyes(cv: Canvas, lay, identity: Identity, px: float, ss: int) -> None:
    dark = (38, 28, 26)
    for eye in lay.eyes:
        (cx, cy), ew, eh = eye.center, eye.ew, eye.eh
        outline = eye.outline.copy()
        outline[:, 1] = cy + 0.82 * (outline[:, 1] - cy)  # real eyes open less than cartoon ones
        eye_mask = cv.full_mask(outline, blur=0.4 * ss)
        cv.fill(outline, (226, 222, 218), alpha=0.95, blur=0.4 * ss)
        r = 0.7 * eh
        ix = cx + 0.12 * identity.pose_yaw * ew
        iris = np.asarray(identity.iris_color, np.float32)
        cv.fill(ellipse(ix, cy + 0.05 * eh, r, r), iris, clip=eye_mask, blur=0.4 * ss)
        cv.stroke(ellipse(ix, cy + 0.05 * eh, r, r), iris * 0.5, cv.width_px(0.6 * px, 1), 0.6, clip=eye_mask)
        cv.fill(ellipse(ix, cy + 0.05 * eh, 0.45 * r, 0.45 * r), (15, 12, 12), clip=eye_mask, blur=0.3 * ss)
        lx, ly = identity.light_dir[0], identity.light_dir[1]
        cv.fill(
            ellipse(ix + 0.4 * r * lx, cy + 0.4 * r * ly, 0.16 * r, 0.16 * r), (255, 255, 255), 0.9, eye_mask
        )
        lid = outline[: len(eye.upper_lid)]
        lid_w = cv.width_px((1.3 if identity.eyelashes else 0.8) * px, 1)
        cv.stroke(lid, dark, lid_w, alpha=0.9 if identity.eyelashes else 0.7, blur=0.3 * ss)
        cv.stroke(lid - [0.0, 0.35 * eh], dark, cv.width_px(0.5 * px, 1), alpha=0.25, blur=0.8 * ss)  # crease
        n = len(outline)
        cv.stroke(outline[n // 2 + 3 : n - 2], dark, cv.width_px(0.5 * px, 1), alpha=0.35, blur=0.4 * ss)
    for lash in lay.lashes:  # fine, shorter lashes rooted on the (less open) photo lid
        eye = min(lay.eyes, key=lambda e: abs(e.center[0] - lash[0, 0]))
        short = lash[0] + 0.55 * (lash - lash[0])
        short[:, 1] -= 0.18 * (lash[0, 1] - eye.center[1])
        cv.stroke(short, dark, cv.width_px(0.5 * px, 1), alpha=0.65, blur=0.25 * ss)
