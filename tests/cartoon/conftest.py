"""Tiny cartoon experiments: 32 px, narrow networks, a handful of toonfaces images."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TINY = """
extends = "{base}"
name = "tiny"
[data]
size = 32
load_size = 36
augment = [{{ name = "HorizontalFlip", p = 0.5 }}, {{ name = "RandomCrop", height = 32, width = 32 }}]
toonfaces = {{ counts = {{ women = [6, 4], men = [3, 2], kids = [2, 2], elderly = [2, 2] }}, test_per_group = 3, cache = "{cache}" }}
[model]
width = 4
image_size = 32
n_blocks = 1
[task]
dis_width = 4
global_layers = 4
local_layers = 3
sample_count = 2
[train]
log_every = 2
checkpoint_every = 2
sample_every = 2
progress = "plain"
compile = "off"
[stages.basic]
steps = {steps}
[stages.transfer]
steps = {steps}
"""


@pytest.fixture(scope="session")
def toon_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("toonfaces-cache")


def tiny_config(cache: Path, base: str = "cartoon_cpu.toml", steps: int = 4, extra: str = "") -> str:
    """The text of a tiny experiment extending ``examples/<base>``, toonfaces cached in ``cache``."""
    text = TINY.format(base=(ROOT / "examples" / base).as_posix(), cache=cache.as_posix(), steps=steps)
    return text + extra


@pytest.fixture(scope="session")
def tiny_cartoon_text(toon_cache):
    """``tiny_config`` bound to the session's toonfaces cache (for fixtures wider than a test)."""
    return lambda **kw: tiny_config(toon_cache, **kw)


@pytest.fixture
def tiny_cartoon(tmp_path, toon_cache):
    def write(
        base: str = "cartoon_cpu.toml", steps: int = 4, extra: str = "", name: str = "tiny.toml"
    ) -> Path:
        path = tmp_path / name
        path.write_text(tiny_config(toon_cache, base, steps, extra))
        return path

    return write


@pytest.fixture(scope="session")
def reference_sections() -> dict[str, dict[str, tuple[int, ...]]]:
    """photo2cartoon's state-dict keys and shapes (generator, global, local), from the sheet."""
    sections: dict[str, dict[str, tuple[int, ...]]] = {}
    current = None
    for line in (Path(__file__).parent / "data" / "photo2cartoon_state_dict.txt").read_text().splitlines():
        if line.startswith("## ") and "state_dict" in line:
            current = line.split()[1]
            sections[current] = {}
        elif current and line.strip() and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            sections[current][key] = tuple(int(x) for x in re.findall(r"\d+", shape))
    return sections


@pytest.fixture
def own_kernels_on_small_maps(monkeypatch) -> None:
    """The plugin's own instance-norm forward and pad-gradient fold on any map, however small:
    tiny test maps then take the paths (channels_last ones included) that 128 px maps take."""
    from branchadapt_cartoon import instnorm, padding

    monkeypatch.setattr(instnorm, "FAST_MIN_NUMEL", 0)
    monkeypatch.setattr(padding, "FOLD_MIN_NUMEL", 0)
