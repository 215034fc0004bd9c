"""A tiny float32 RGB canvas drawing canonical-unit shapes with OpenCV anti-aliasing.

Shapes are rasterised only inside their bounding box (region of interest), which
keeps rendering of one face at a few milliseconds.
"""

from __future__ import annotations

import cv2
import numpy as np

_SHIFT = 4
_ONE = 1 << _SHIFT

Color = tuple[float, float, float]


class Canvas:
    def __init__(self, n: int, aff: np.ndarray, background: np.ndarray | Color):
        self.n = n
        self.m = aff * n  # canonical -> pixel
        self.unit = float(np.hypot(self.m[0, 0], self.m[1, 0]))  # pixels per canonical unit
        if isinstance(background, np.ndarray):
            self.img = background.astype(np.float32, copy=True)
        else:
            self.img = np.empty((n, n, 3), np.float32)
            self.img[:] = np.asarray(background, np.float32)

    def px(self, pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, np.float64)
        return pts @ self.m[:, :2].T + self.m[:, 2]

    def width_px(self, w: float, minimum: float = 1.0) -> int:
        return max(int(minimum), round(w * self.unit))

    def _roi(self, p: np.ndarray, pad: float):
        x0 = max(0, int(np.floor(p[:, 0].min() - pad)))
        y0 = max(0, int(np.floor(p[:, 1].min() - pad)))
        x1 = min(self.n, int(np.ceil(p[:, 0].max() + pad)) + 1)
        y1 = min(self.n, int(np.ceil(p[:, 1].max() + pad)) + 1)
        if x1 <= x0 or y1 <= y0:
            return None
        return x0, y0, x1, y1

    def mask(
        self,
        pts: np.ndarray,
        width: int | None = None,
        closed: bool = False,
        blur: float = 0.0,
        roi=None,
    ):
        """Rasterise a filled polygon (``width`` None) or a polyline; returns (roi, float mask)."""
        p = self.px(pts)
        if roi is None:
            roi = self._roi(p, (width or 0) + 3.0 * blur + 2.0)
            if roi is None:
                return None, None
        x0, y0, x1, y1 = roi
        buf = np.zeros((y1 - y0, x1 - x0), np.uint8)
        q = np.round((p - [x0, y0]) * _ONE).astype(np.int32)
        if width is None:
            cv2.fillPoly(buf, [q], 255, cv2.LINE_AA, _SHIFT)
        else:
            cv2.polylines(buf, [q], closed, 255, int(width), cv2.LINE_AA, _SHIFT)
        m = buf.astype(np.float32) * (1.0 / 255.0)
        if blur > 0:
            m = cv2.GaussianBlur(m, (0, 0), blur)
        return roi, m

    def full_mask(self, pts: np.ndarray, width: int | None = None, blur: float = 0.0) -> np.ndarray:
        out = np.zeros((self.n, self.n), np.float32)
        roi, m = self.mask(pts, width, blur=blur)
        if roi is not None:
            x0, y0, x1, y1 = roi
            out[y0:y1, x0:x1] = m
        return out

    def blend(self, roi, m: np.ndarray, color, alpha: float = 1.0, clip: np.ndarray | None = None):
        x0, y0, x1, y1 = roi
        if clip is not None:
            m = m * clip[y0:y1, x0:x1]
        if alpha != 1.0:
            m = m * alpha
        reg = self.img[y0:y1, x0:x1]
        col = np.asarray(color, np.float32)
        if col.ndim == 3:  # per-pixel colour image covering the full canvas
            col = col[y0:y1, x0:x1]
        reg += m[..., None] * (col - reg)

    def fill(self, pts, color, alpha: float = 1.0, clip=None, blur: float = 0.0):
        roi, m = self.mask(pts, None, blur=blur)
        if roi is not None:
            self.blend(roi, m, color, alpha, clip)

    def stroke(self, pts, color, width: int, alpha: float = 1.0, closed=False, clip=None, blur=0.0):
        roi, m = self.mask(pts, width, closed, blur)
        if roi is not None:
            self.blend(roi, m, color, alpha, clip)

    def paint(self, pts, color, outline, width: int, clip=None):
        """Flat fill plus dark outline (the cartoon look)."""
        self.fill(pts, color, clip=clip)
        self.stroke(pts, outline, width, closed=True, clip=clip)

    def result(self, size: int) -> np.ndarray:
        img = self.img
        if self.n != size:
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)
