"""The experiment file's schema (pydantic v2).

Plugin components (``model``, ``task``, ``data``, ``splitter``, ``sampler``, each loss) are
``{type = "name", ...options}`` tables; the core validates their shape here and each plugin's own
``Options`` model validates the rest (see :mod:`branchadapt.loading`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .scalars import TomlTyped

GroupName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
StageName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_]*$")]


class _Strict(TomlTyped):
    model_config = ConfigDict(extra="forbid")


class ComponentSpec(BaseModel):
    """A plugin reference: ``type`` names the registered implementation, other keys are its options."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="registered name of the implementation")

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ScheduleSpec(_Strict):
    type: Literal["constant", "linear_decay", "cosine"] = "constant"
    start: float = Field(0.5, ge=0, le=1, description="fraction of the stage's steps before decay starts")
    warmup: int = Field(0, ge=0, description="steps of linear warm-up from 0")


class OptimSpec(_Strict):
    type: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-4, gt=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="Adam's decay rates of the gradient's moments, each in [0, 1)"
    )
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)


class TrainSpec(_Strict):
    """Cadence and plumbing; none of it changes the maths, so it is not part of the config hash."""

    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=0, description="0: only at the end of each stage")
    keep_last: int = Field(3, ge=1, description="checkpoints kept per stage")
    sample_every: int = Field(0, ge=0, description="steps between the task's training samples; 0: none")
    workers: int = Field(0, ge=0, description="data-loading worker processes")
    progress: Literal["auto", "rich", "plain", "none"] = "auto"
    fused_optimizers: bool = Field(
        True,
        description="torch's fused Adam/AdamW kernels where the parameters' device has them (CPU, CUDA); "
        "false: torch's default kernels (a per-parameter loop on CPU, foreach on CUDA). Same maths up to "
        "rounding, see docs/performance.md",
    )
    retain_freed_memory: bool = Field(
        True,
        description="on a CPU device with glibc, keep freed memory in the process for reuse instead of "
        "returning it to the kernel (fewer page faults; the process stays at its peak memory between "
        "steps); skipped when MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ is set; process-wide. "
        "See docs/performance.md",
    )
    stack_branches: bool | Literal["auto"] = Field(
        "auto",
        description="true: run several groups' copies of a branch stage as one vmap call over stacked weights "
        "instead of a loop over the groups, where the groups present have equal row counts and the stage "
        "has no buffers (same maths up to rounding); auto: only for batches of at most 8 MiB on a CPU "
        "(larger ones are faster as a loop there) and always on an accelerator; false: always the loop "
        "(see docs/performance.md)",
    )
    fuse_participation: bool | Literal["auto"] = Field(
        "auto",
        description="true: run live and detached groups of a mixed batch as one call through the shared "
        "stages, shared weight gradients taken from the live rows only (needs a backbone declaring "
        "rows_independent; falls back to separate calls, with one warning, where it cannot; same maths up "
        "to rounding); auto: only for batches whose inputs take at most 512 KiB on a CPU (larger ones "
        "were faster as separate calls there) and always on an accelerator; false: separate calls "
        "(see docs/performance.md)",
    )
    compile: Literal["off", "units", "auto"] = Field(
        "off",
        description="units: torch.compile the backbone's declared repeated blocks (compiles on the first "
        "steps; pays off on long runs at large sizes, see docs/performance.md); auto: units on CUDA, "
        "off on other devices (on CPU the gain depends on the machine)",
    )


class StageSpec(_Strict):
    """One phase of a run; ``splitter``/``sampler``/``losses``/``optim`` override the top-level ones."""

    steps: int = Field(ge=1)
    enabled: bool = True
    description: str = ""
    groups: list[GroupName] | None = Field(
        None, min_length=1, description="groups sampled in this stage (default: all)"
    )
    init_from: str | None = Field(None, description="an earlier stage whose final weights start this one")
    splitter: ComponentSpec
    sampler: ComponentSpec
    losses: dict[str, ComponentSpec] = Field(default_factory=dict)
    optim: dict[str, OptimSpec] = Field(default_factory=dict)


#: the splitter and sampler of an experiment (and a table of them) that names no type
DEFAULT_TYPES = {"splitter": "single", "sampler": "per_group"}


class Experiment(_Strict):
    """An experiment file after ``extends`` and ``--set`` overrides are applied."""

    name: str = Field(
        "experiment",
        description="run name: one folder name, the run directory runs/<name> by default",
    )
    seed: int = Field(0, ge=0, lt=2**62, description="seeds weights, sampling and augmentation")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 enables autocast")
    run_dir: str | None = Field(
        None,
        description="default: runs/<name> under the current directory; a relative path is taken beside the "
        "experiment file",
    )
    plugins: list[str] = Field(default_factory=list, description="local plugin modules to import")
    groups: list[GroupName] = Field(min_length=1)
    anchor: GroupName | None = Field(None, description="the many-sample group (default: first group)")
    data: ComponentSpec
    task: ComponentSpec
    model: ComponentSpec
    splitter: ComponentSpec = Field(default_factory=lambda: ComponentSpec(type=DEFAULT_TYPES["splitter"]))
    sampler: ComponentSpec = Field(default_factory=lambda: ComponentSpec(type=DEFAULT_TYPES["sampler"]))
    losses: dict[str, ComponentSpec] = Field(default_factory=dict)
    optim: dict[str, OptimSpec] = Field(default_factory=dict)
    train: TrainSpec = Field(default_factory=TrainSpec)
    stages: dict[StageName, StageSpec] = Field(min_length=1)

    @field_validator("groups")
    @classmethod
    def _unique_groups(cls, groups: list[str]) -> list[str]:
        dupes = sorted({g for g in groups if groups.count(g) > 1})
        if dupes:
            raise ValueError(f"group names must be unique; repeated: {dupes}")
        return groups

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if name.strip() in ("", ".", "..") or re.search(r"[/\\\x00-\x1f]", name):
            raise ValueError(
                "expected one folder name (the run directory is runs/<name>): not empty, '.' or '..', "
                "without '/', '\\' or control characters"
            )
        return name

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        base = device.split(":")[0]
        if base not in {"auto", "cpu", "cuda", "mps"}:
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return device

    @model_validator(mode="before")
    @classmethod
    def _inherit(cls, data: Any) -> Any:
        return inherit_defaults(data)

    @model_validator(mode="after")
    def _check_references(self) -> Experiment:
        groups = set(self.groups)
        if self.anchor is not None and self.anchor not in groups:
            raise ValueError(f"anchor: {self.anchor!r} is not one of the groups {self.groups}")
        seen: list[str] = []
        for name, stage in self.stages.items():
            for g in stage.groups or []:
                if g not in groups:
                    raise ValueError(f"stages.{name}.groups: {g!r} is not one of the groups {self.groups}")
            if stage.init_from is not None and stage.init_from not in seen:
                raise ValueError(
                    f"stages.{name}.init_from: {stage.init_from!r} is not an earlier enabled stage "
                    f"(earlier: {seen or 'none'})"
                )
            if stage.enabled:
                seen.append(name)
        if not seen:
            raise ValueError("stages: every stage is disabled; enable at least one")
        return self

    @property
    def anchor_group(self) -> str:
        return self.anchor or self.groups[0]


def inherit_defaults(data: Any) -> Any:
    """Give every stage the top-level splitter/sampler/losses/optim, overridden by its own."""
    if not isinstance(data, dict):
        return data
    if not isinstance(data.get("stages"), dict):  # reported as such; the top level is still read as usual
        return {**data, "losses": _typed(data["losses"])} if isinstance(data.get("losses"), dict) else data
    data = dict(data)
    for key, default in DEFAULT_TYPES.items():  # a table without a type (--set sampler.per_group=2)
        table = data.get(key, {})
        data[key] = {"type": default, **table} if isinstance(table, dict) else table
    defaults = {
        "splitter": data["splitter"],
        "sampler": data["sampler"],
        "losses": data.get("losses", {}),
        "optim": data.get("optim", {}),
    }
    stages = {}
    for name, stage in data["stages"].items():
        if isinstance(stage, dict):
            stage = dict(stage)
            for key in ("splitter", "sampler"):
                stage[key] = merge_component(defaults[key], stage.get(key))
            for key in ("losses", "optim"):
                own = stage.get(key, {})
                if isinstance(own, dict) and isinstance(defaults[key], dict):
                    merged = {k: merge_component(v, own.get(k)) for k, v in defaults[key].items()}
                    merged.update({k: v for k, v in own.items() if k not in merged})
                    stage[key] = merged
            if isinstance(stage.get("losses"), dict):
                stage["losses"] = _typed(stage["losses"])
        stages[name] = stage
    data["stages"] = stages
    if isinstance(data.get("losses"), dict):
        data["losses"] = _typed(data["losses"])
    return data


def _typed(losses: dict[str, Any]) -> dict[str, Any]:
    """A loss table's ``type`` defaults to its key: ``[losses.cycle]`` means the ``cycle`` loss."""
    return {k: {"type": k, **v} if isinstance(v, dict) and "type" not in v else v for k, v in losses.items()}


def merge_component(base: Any, override: Any) -> Any:
    """Deep-merge ``override`` onto ``base``; a different ``type`` replaces the whole table."""
    if override is None:
        return base
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    if "type" in override and "type" in base and override["type"] != base["type"]:
        return override
    return deep_merge(base, override)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values of ``override`` win, nested tables merge.

    A table that names a different component ``type`` than its base replaces it whole: the
    options of one implementation mean nothing to another.
    """
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            old = out[key]
            same = "type" not in value or "type" not in old or value["type"] == old["type"]
            out[key] = deep_merge(old, value) if same else dict(value)
        else:
            out[key] = value
    return out
