"""toonfaces: a deterministic procedural data set of face photos and face cartoons.

Four groups (``GROUPS``): young women (anchor), young men, kids, elderly.  All
cartoons share one flat-colour style with dark outlines on white; group traits
are eyelashes (women), beard/stubble (men), blush and child proportions (kids),
wrinkles and grey hair (elderly).  Photos of the same identity are rendered with
shading, texture, a light varied background and camera noise, geometrically
aligned with the cartoon.
"""

from .dataset import (
    DEFAULT_TRAIN_COUNTS,
    KINDS,
    SPLITS,
    TEST_PER_GROUP,
    ToonFaces,
    generate_image,
    identity_for,
    identity_seed,
)
from .geometry import Layout, affine, canonical_grid, layout
from .identity import GROUPS, Identity, sample_identity
from .preview import make_preview, save_preview
from .render import render_cartoon, render_photo

__all__ = [
    "DEFAULT_TRAIN_COUNTS",
    "GROUPS",
    "KINDS",
    "SPLITS",
    "TEST_PER_GROUP",
    "Identity",
    "Layout",
    "ToonFaces",
    "affine",
    "canonical_grid",
    "generate_image",
    "identity_for",
    "identity_seed",
    "layout",
    "make_preview",
    "render_cartoon",
    "render_photo",
    "sample_identity",
    "save_preview",
]
