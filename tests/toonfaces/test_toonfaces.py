"""Tests of the procedural toonfaces data set (plugins/branchadapt_toonfaces).

Run with ``PYTHONPATH=plugins pytest tests/toonfaces``.  Trait tests measure the
rendered CARTOON pixels inside regions located from the identity geometry.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

tf = pytest.importorskip("branchadapt_toonfaces")
from branchadapt_toonfaces.geometry import face_half_width  # noqa: E402

SIZE = 128
N_PER_GROUP = 6


# ---------------------------------------------------------------- helpers
def _ident(group: str, i: int, split: str = "test", kind: str = "cartoon"):
    return tf.identity_for(7, split, group, kind, i)


def _cartoons(group: str, n: int = N_PER_GROUP, size: int = SIZE):
    for i in range(n):
        ident = _ident(group, i)
        yield ident, tf.layout(ident), tf.render_cartoon(ident, size)


def _px_unit(ident, size: int) -> float:
    """One pixel in canonical units."""
    return 1.0 / (size * ident.pose_scale)


def _hsv(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)


def cheek_mask(ident, lay, size):
    x, y = tf.canonical_grid(ident, size)
    rx, ry = lay.cheek_radii
    m = np.zeros((size, size), bool)
    for cx, cy in lay.cheeks:
        m |= ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    return m


def lash_band_mask(ident, lay, size):
    """Skin band above each upper lid (excluding the lid line itself, below the brows)."""
    x, y = tf.canonical_grid(ident, size)
    margin = 3.0 * _px_unit(ident, size)
    m = np.zeros((size, size), bool)
    for eye in lay.eyes:
        cx, cy = eye.center
        dx, dy = x - cx, y - cy
        outside_lid = (dx / (eye.ew + margin)) ** 2 + (dy / (eye.eh + margin)) ** 2 > 1.0
        inside_band = (dx / (1.45 * eye.ew)) ** 2 + (dy / (eye.eh + 0.65 * eye.ew)) ** 2 <= 1.0
        m |= outside_lid & inside_band & (dy < -0.2 * eye.eh) & (np.abs(dx) < 1.25 * eye.ew)
    return m & (np.abs(x) < 0.85 * face_half_width(lay.face, y))


def forehead_mask(ident, lay, size):
    x, y = tf.canonical_grid(ident, size)
    margin = 2.0 * _px_unit(ident, size)
    return (np.abs(x) < 0.4 * lay.fw) & (y > lay.hairline_y + margin) & (y < lay.brow_top - margin)


def hair_mask(ident, lay, size):
    """Front hair polygons rasterised from the geometry, eroded away from the outlines."""
    m = np.zeros((size, size), np.uint8)
    aff = tf.affine(ident) * size
    for poly in lay.hair_front:
        p = poly @ aff[:, :2].T + aff[:, 2]
        cv2.fillPoly(m, [np.round(p * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return cv2.erode(m, np.ones((5, 5), np.uint8)).astype(bool)


def blush_fraction(img, mask):
    hsv = _hsv(img)[mask]
    pink = ((hsv[:, 0] >= 160) | (hsv[:, 0] <= 3)) & (hsv[:, 1] >= 60) & (hsv[:, 2] >= 110)
    return float(pink.mean())


def dark_fraction(img, mask, thr: float = 100.0):
    return float((img[mask].max(axis=1) < thr).mean()) if mask.any() else 0.0


def lash_pixels(img, mask):
    return int((img[mask].max(axis=1) < 100).sum())


def wrinkle_fraction(ident, img, mask):
    if not mask.any():
        return 0.0
    skin = np.asarray(ident.skin_tone, np.float32) * 0.92 + 255 * 0.08
    lum = img[mask].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return float((lum < 0.85 * float(skin @ np.array([0.299, 0.587, 0.114]))).mean())


def hair_sat_val(img, mask):
    hsv = _hsv(img)[mask]
    return float(np.median(hsv[:, 1])) / 255.0, float(np.median(hsv[:, 2]))


def foreground(img: np.ndarray, photo: bool) -> np.ndarray:
    """Non-background mask: background = near-background pixels connected to the border."""
    if photo:  # smooth background: flood fill with a small floating range from the top border
        f = cv2.GaussianBlur(img, (0, 0), 1.5)
        n = img.shape[0]
        flood = np.zeros((n + 2, n + 2), np.uint8)
        flags = 4 | cv2.FLOODFILL_MASK_ONLY | (1 << 8)
        for x, y in ((0, 0), (n - 1, 0), (n // 2, 0), (0, n // 2), (n - 1, n // 2)):
            if not flood[y + 1, x + 1]:
                cv2.floodFill(f, flood, (x, y), 0, (3, 3, 3), (3, 3, 3), flags)
        cand = flood[1:-1, 1:-1].astype(bool)
    else:
        cand = img.min(axis=2) >= 240
    _count, labels = cv2.connectedComponents(cand.astype(np.uint8), connectivity=4)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    bg = np.isin(labels, edge[edge > 0]) & cand
    return ~bg


def high_freq(img: np.ndarray) -> float:
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float(np.median(np.abs(cv2.Laplacian(g, cv2.CV_32F))))


def _group_metric(fn, group):
    return [fn(ident, lay, img) for ident, lay, img in _cartoons(group)]


# ---------------------------------------------------------------- determinism / seeds
def test_generate_image_is_deterministic_and_seed_dependent():
    for kind in tf.KINDS:
        a = tf.generate_image(3, "train", "kids", kind, 5, 64)
        b = tf.generate_image(3, "train", "kids", kind, 5, 64)
        assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
        assert a.tobytes() == b.tobytes()
        assert not np.array_equal(a, tf.generate_image(4, "train", "kids", kind, 5, 64))
        assert not np.array_equal(a, tf.generate_image(3, "train", "kids", kind, 6, 64))


def test_any_resolution_works():
    for size in (32, 48, 200, 512):
        for kind in tf.KINDS:
            img = tf.generate_image(0, "test", "elderly", kind, 0, size)
            assert img.shape == (size, size, 3) and img.dtype == np.uint8
            assert img.std() > 10


def test_seeds_are_stable_ints_and_validate():
    s = tf.identity_seed(0, "train", "women", "photo", 0)
    assert isinstance(s, int) and s == tf.identity_seed(0, "train", "women", "photo", 0)
    with pytest.raises(ValueError, match="women, men, kids, elderly"):
        tf.identity_seed(0, "train", "aliens", "photo", 0)
    with pytest.raises(ValueError, match="women, men, kids, elderly"):
        tf.sample_identity("teens", np.random.default_rng(0))
    with pytest.raises(ValueError):
        tf.identity_seed(0, "val", "women", "photo", 0)


def test_pairing_and_train_test_disjointness():
    for group in tf.GROUPS:
        train_seeds, test_seeds = set(), set()
        for i in range(25):
            tp = tf.identity_seed(0, "train", group, "photo", i)
            tc = tf.identity_seed(0, "train", group, "cartoon", i)
            assert tp != tc  # train is unpaired
            assert tf.identity_for(0, "train", group, "photo", i) != tf.identity_for(
                0, "train", group, "cartoon", i
            )
            ep = tf.identity_seed(0, "test", group, "photo", i)
            assert ep == tf.identity_seed(0, "test", group, "cartoon", i)  # test is paired
            train_seeds |= {tp, tc}
            test_seeds.add(ep)
            test_id = tf.identity_for(0, "test", group, "photo", i)
            for kind in tf.KINDS:
                assert test_id != tf.identity_for(0, "train", group, kind, i)
        assert not train_seeds & test_seeds


# ---------------------------------------------------------------- group traits (cartoon pixels)
def test_blush_kids_much_higher_than_men_and_women():
    val = {
        g: np.mean(_group_metric(lambda i, lay, im: blush_fraction(im, cheek_mask(i, lay, SIZE)), g))
        for g in tf.GROUPS
    }
    assert val["kids"] > 0.5
    assert val["men"] < 0.02
    assert val["kids"] > 5 * val["men"] + 0.4
    assert val["kids"] > 2 * val["women"]


def test_eyelash_strokes_for_women_only():
    per = {
        g: _group_metric(lambda i, lay, im: lash_pixels(im, lash_band_mask(i, lay, SIZE)), g)
        for g in tf.GROUPS
    }
    assert min(per["women"]) >= 15
    assert max(per["men"]) <= 2
    assert np.mean(per["women"]) > 5 * max(np.mean(per[g]) for g in ("men", "kids", "elderly")) + 10


def test_grey_hair_for_elderly_only():
    sv = {
        g: _group_metric(lambda i, lay, im: hair_sat_val(im, hair_mask(i, lay, SIZE)), g) for g in tf.GROUPS
    }
    for sat, val in sv["elderly"]:
        assert sat < 0.15 and val > 140
    for g in ("women", "men", "kids"):
        for sat, val in sv[g]:
            assert sat > 0.2 or val < 120


def test_forehead_wrinkles_for_elderly_only():
    wr = {
        g: _group_metric(lambda i, lay, im: wrinkle_fraction(i, im, forehead_mask(i, lay, SIZE)), g)
        for g in tf.GROUPS
    }
    assert min(wr["elderly"]) > 0.1
    for g in ("women", "men", "kids"):
        assert max(wr[g]) < 0.01


def test_beard_darkens_the_chin_for_men():
    def chin_dark(ident, lay, img):
        x, y = tf.canonical_grid(ident, SIZE)
        chin = (np.abs(x) < 0.3 * lay.fw) & (y > lay.mouth_y + 0.12 * lay.fh) & (y < 0.9 * lay.fh)
        lum = img[chin].astype(np.float32).mean(axis=1)
        return float(np.median(lum)) / float(np.mean(ident.skin_tone))

    men = _group_metric(chin_dark, "men")
    women = _group_metric(chin_dark, "women")
    assert max(men) < 0.85 < min(women)


def test_kid_proportions():
    kids = [_ident("kids", i) for i in range(10)]
    adults = [_ident(g, i) for g in ("women", "men") for i in range(10)]
    assert min(k.face_width / k.face_height for k in kids) > max(a.face_width / a.face_height for a in adults)
    assert min(k.eye_size for k in kids) > max(a.eye_size for a in adults if a.group == "men")
    assert max(k.nose_length for k in kids) < min(a.nose_length for a in adults)


# ---------------------------------------------------------------- photo vs cartoon
def test_photo_and_cartoon_correspond_and_photo_looks_like_a_photo():
    for group in tf.GROUPS:
        for i in range(3):
            photo = tf.generate_image(11, "test", group, "photo", i, SIZE)
            cartoon = tf.generate_image(11, "test", group, "cartoon", i, SIZE)
            fp, fc = foreground(photo, True), foreground(cartoon, False)
            iou = (fp & fc).sum() / (fp | fc).sum()
            assert iou > 0.7, (group, i, iou)
            assert high_freq(photo) > 1.5 and high_freq(cartoon) < 0.5
            corners = np.concatenate([photo[:8, :8], photo[:8, -8:]]).reshape(-1, 3)
            assert corners.mean() < 248 and corners.std() > 1.0  # light, varied, not white
            assert (cartoon[:4, :4] == 255).all()


# ---------------------------------------------------------------- cache
TINY = {"women": (4, 2), "men": (2, 1), "kids": (1, 1), "elderly": (1, 0)}


def _all_pngs(path):
    return sorted(p for p in path.rglob("*.png"))


def test_cache_generation_reuse_and_completion(tmp_path):
    ds = tf.ToonFaces(tmp_path, size=32, seed=1, train_counts=TINY, test_per_group=2)
    path = ds.ensure()
    assert path.name.startswith("toonfaces-s32-seed1-") and (path / "DONE").is_file()
    assert len(ds.files("train", "photo", "women")) == 4
    assert len(ds.files("train", "cartoon", "elderly")) == 0
    assert [p.name for p in ds.files("test", "cartoon", "men")] == ["00000.png", "00001.png"]
    assert len(_all_pngs(path)) == 8 + 4 + 2 * 4 * 2
    assert all(p.is_file() for p in ds.files("test", "photo", "kids"))
    img = cv2.cvtColor(cv2.imread(str(ds.files("test", "photo", "kids")[1])), cv2.COLOR_BGR2RGB)
    assert np.array_equal(img, tf.generate_image(1, "test", "kids", "photo", 1, 32))

    mtimes = {p: p.stat().st_mtime_ns for p in _all_pngs(path)}
    done_mtime = (path / "DONE").stat().st_mtime_ns
    assert tf.ToonFaces(tmp_path, size=32, seed=1, train_counts=TINY, test_per_group=2).ensure() == path
    assert {p: p.stat().st_mtime_ns for p in _all_pngs(path)} == mtimes
    assert (path / "DONE").stat().st_mtime_ns == done_mtime

    # a partial cache (no DONE marker) is completed, existing files are kept
    lost = [ds.files("train", "photo", "women")[2], ds.files("test", "cartoon", "elderly")[0]]
    (path / "DONE").unlink()
    with pytest.raises(FileNotFoundError, match="not generated yet"):
        ds.files("train", "photo", "women")
    old_bytes = [p.read_bytes() for p in lost]
    for p in lost:
        p.unlink()
    (lost[0].parent / ".00002.png.123.tmp").write_bytes(b"half-written")
    with pytest.raises(FileNotFoundError):
        ds.files("train", "photo", "women")
    ds.ensure()
    assert (path / "DONE").is_file()
    assert [p.read_bytes() for p in lost] == old_bytes
    assert not list(path.rglob("*.tmp"))
    kept = {p: t for p, t in mtimes.items() if p not in lost}
    assert {p: p.stat().st_mtime_ns for p in kept} == kept

    # another configuration gets another folder
    other = tf.ToonFaces(tmp_path, size=32, seed=1, train_counts={"women": (1, 1)}, test_per_group=1)
    assert other.path != path and other.groups == ("women",)
