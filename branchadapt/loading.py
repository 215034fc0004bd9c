"""Experiment files: TOML with ``extends``, ``--set`` overrides, and two-pass validation.

Pass 1 validates the core schema (:class:`~branchadapt.config.Experiment`); pass 2 resolves every
component's ``type`` in the registry and validates its options with the plugin's own model. Both
report every problem as ``file: dotted.key.path: what was expected (got value)``.
"""

from __future__ import annotations

import builtins
import difflib
import hashlib
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .config import ComponentSpec, Experiment, OptimSpec, StageSpec, inherit_defaults
from .errors import ConfigError, RegistryError, UserError
from .interfaces import PluginOptions
from .paths import files_not_required, relative_to
from .plugins import PluginSet, default_plugins
from .reading import apply_override, read_toml


@dataclass
class Component:
    """A resolved plugin reference: its class and validated options."""

    kind: str
    type: str
    cls: builtins.type[Any]
    options: PluginOptions
    where: str


@dataclass
class ResolvedStage:
    name: str
    spec: StageSpec
    groups: tuple[str, ...]
    splitter: Component
    sampler: Component
    losses: dict[str, Component]
    optim: dict[str, OptimSpec]  # phase name (or "default") -> spec with defaults applied


@dataclass
class ResolvedExperiment:
    """A validated experiment: the spec, its source, and every component resolved."""

    spec: Experiment
    source: Path
    model: Component
    task: Component
    data: Component
    stages: list[ResolvedStage]
    plugins: PluginSet
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def config_hash(self) -> str:
        return config_hash(self.spec)

    @property
    def base_dir(self) -> Path:
        return self.source.parent

    @property
    def run_dir(self) -> Path:
        return default_run_dir(self.spec, self.source)

    def optim_for(self, stage: ResolvedStage, phase: str) -> OptimSpec:
        return stage.optim.get(phase) or stage.optim.get("default") or OptimSpec()


def default_run_dir(spec: Experiment, source: Path) -> Path:
    """The experiment's own run directory: ``run_dir`` (relative: beside the file) or ``runs/<name>``."""
    if spec.run_dir:
        path = Path(spec.run_dir)
        return path if path.is_absolute() else source.parent / path
    return Path("runs") / spec.name


#: top-level keys that do not change the maths: a run may resume with them changed
UNHASHED = frozenset({"run_dir", "train", "device", "name"})


def config_hash(spec: Experiment) -> str:
    """Hash of everything that changes the maths (not the :data:`UNHASHED` keys)."""
    payload = spec.model_dump(mode="json", exclude=set(UNHASHED))
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- errors
def dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _strip_optional(tp: Any) -> Any:
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if get_origin(tp) in (Union, UnionType) and len(args) == 1 else tp


def _known_keys(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """Field names of the model found at ``loc`` (dict keys and list indices step into values)."""
    tp: Any = model
    for part in loc:
        tp = _strip_optional(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            found = tp.model_fields.get(part) if isinstance(part, str) else None
            if found is None:
                return []
            tp = found.annotation
        elif get_origin(tp) in (dict, list):
            tp = get_args(tp)[-1]
        else:
            return []
    tp = _strip_optional(tp)
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def describe(error: Mapping[str, Any], model: type[BaseModel], prefix: Sequence[str | int] = ()) -> str:
    loc = [*prefix, *error["loc"]]
    if error["type"] == "extra_forbidden":
        known = _known_keys(model, error["loc"][:-1])
        close = difflib.get_close_matches(str(error["loc"][-1]), known, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else "."
        return f"{dotted(loc)}: unknown key{hint} Expected one of: {', '.join(known) or '(no keys)'}"
    got = error.get("input")
    shown = "" if isinstance(got, dict | list) or error["type"] == "missing" else f" (got {got!r})"
    message = str(error["msg"]).removeprefix("Value error, ")  # a validator's own words
    if not loc and re.match(r"[\w.\[\]]+: ", message):  # a whole-file check naming its key itself
        return f"{message}{shown}"
    if error["type"] == "value_error" and message.startswith((".", "[")):  # an item's own key path
        return f"{dotted(loc) if error['loc'] else dotted(prefix)}{message}"
    return f"{dotted(loc) if error['loc'] else dotted(prefix)}: {message}{shown}"


# ---------------------------------------------------------------------------- loading
def load_experiment(
    path: str | Path,
    overrides: Sequence[str] = (),
    plugins: PluginSet | None = None,
    *,
    files_not_needed: Callable[[Experiment, Path], Collection[str]] | None = None,
) -> ResolvedExperiment:
    """Read, merge, override and fully validate an experiment file. ``overrides`` are
    ``"KEY.PATH=VALUE"`` strings (the CLI's ``--set``), applied in order: ``["stages.basic.steps=3"]``.

    ``files_not_needed``, given the core-validated experiment and its file, names keys (such as
    ``"stages.basic"`` or ``"data"``) whose options are validated without checking that the files
    they name exist (:func:`~branchadapt.paths.files_not_required`): parts of a resumed run that
    will not run again (:func:`branchadapt.rundir.load_for_run`)."""
    if isinstance(overrides, str | bytes):  # one string would be taken as one override per character
        raise TypeError(f"overrides must be a list of 'KEY.PATH=VALUE' strings, got the string {overrides!r}")
    source = Path(path)
    raw = read_toml(source)
    for assignment in overrides:
        apply_override(raw, assignment)
    plugins = plugins or default_plugins()
    local = raw.get("plugins", [])
    if isinstance(local, list) and all(isinstance(m, str) for m in local):
        try:
            plugins.load_modules(local, search_dir=source.resolve().parent, where="plugins")
        except (RegistryError, UserError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
    try:
        spec = Experiment.model_validate(raw)
    except ValidationError as exc:
        lines = [describe(e, Experiment) for e in exc.errors()]
        lines += _component_problems(inherit_defaults(raw), plugins, source)  # plugin options too, at once
        raise ConfigError(_report(source, sorted({_inherited(line, raw) for line in lines}))) from None
    skipped = frozenset(files_not_needed(spec, source)) if files_not_needed else frozenset()
    return resolve(spec, source, plugins, raw, skipped)


def _component_problems(raw: Any, plugins: PluginSet, source: Path) -> list[str]:
    """Best-effort pass 2 on a config that failed pass 1: check every well-formed component."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        return problems
    places: list[tuple[str, Any, str]] = [
        (k, raw.get(n), n) for k, n in (("backbone", "model"), ("task", "task"), ("data", "data"))
    ]
    stages = raw.get("stages")
    for name, stage in (stages or {}).items() if isinstance(stages, dict) else []:
        if not isinstance(stage, dict):
            continue
        places += [("splitter", stage.get("splitter"), f"stages.{name}.splitter")]
        places += [("sampler", stage.get("sampler"), f"stages.{name}.sampler")]
        losses = stage.get("losses")
        for loss, spec in (losses or {}).items() if isinstance(losses, dict) else []:
            places.append(("loss", spec, f"stages.{name}.losses.{loss}"))
    for kind, value, where in places:
        if isinstance(value, dict) and isinstance(value.get("type"), str):
            with relative_to(source.parent):  # as resolve() does: relative paths beside the file
                check_component(plugins, kind, ComponentSpec.model_validate(value), where, problems)
    return problems


def check_component(
    plugins: PluginSet, kind: str, comp: ComponentSpec, where: str, problems: list[str]
) -> Component | None:
    """Resolve ``comp.type`` and validate its options; problems are appended, not raised."""
    reg = plugins.registry
    try:
        cls = reg.get(kind, comp.type)
    except RegistryError:
        problems.append(f"{where}.type: {reg.unknown_message(kind, comp.type)}")
        return None
    options_model: type[PluginOptions] = getattr(cls, "Options", PluginOptions)
    try:
        options = options_model.model_validate(comp.options())
    except ValidationError as exc:
        problems.extend(describe(e, options_model, where.split(".")) for e in exc.errors())
        return None
    return Component(kind, comp.type, cls, options, where)


def _inherited(line: str, raw: dict[str, Any]) -> str:
    """Point an error in an inherited stage value at the top-level key it came from."""
    m = re.match(r"stages\.([^.]+)\.(splitter|sampler|losses|optim)((?:\.[^:]*)?)(:.*)", line, re.S)
    if not m:
        return line
    stage, section, rest, tail = m.groups()  # rest: "" for the table itself (a model validator's error)
    own = rest.split(".")[1] if rest else None
    top = raw.get(section)
    if section in ("losses", "optim") and own and not (isinstance(top, dict) and own in top):
        return line  # a loss or phase of the stage's own: nothing at the top level to point to
    node: Any = raw.get("stages", {}).get(stage, {}).get(section)
    for key in rest.split(".")[1:]:
        if not isinstance(node, dict) or key not in node:
            return f"{section}{rest}{tail}"
        node = node[key]
    return line if rest or isinstance(node, dict) else f"{section}{tail}"


def _report(source: Path, lines: list[str]) -> str:
    lines = list(dict.fromkeys(lines))
    head = f"{source}: {len(lines)} problem{'s' if len(lines) > 1 else ''} in the experiment"
    return "\n".join([head, *(f"  {line}" for line in lines)])


def resolve(
    spec: Experiment,
    source: Path,
    plugins: PluginSet,
    raw: dict[str, Any],
    files_not_needed: Collection[str] = (),
) -> ResolvedExperiment:
    """Pass 2: resolve every component and validate its options; all problems reported at once.
    Components under a key of ``files_not_needed`` skip their file-existence checks."""
    problems: list[str] = []

    def component(kind: str, comp: ComponentSpec, where: str) -> Component | None:
        unneeded = any(where == key or where.startswith(f"{key}.") for key in files_not_needed)
        # relative paths in options: beside the experiment file
        with relative_to(source.parent), files_not_required() if unneeded else nullcontext():
            return check_component(plugins, kind, comp, where, problems)

    model = component("backbone", spec.model, "model")
    task = component("task", spec.task, "task")
    data = component("data", spec.data, "data")

    def splitter_groups(comp: Component | None, where: str) -> None:
        if comp is not None:
            problems.extend(f"{where}.{p}" for p in comp.cls(comp.options).check_groups(spec.groups))

    # checked even where every stage names its own; files only in a stage's merged copy (its key)
    with files_not_required():
        splitter_groups(component("splitter", spec.splitter, "splitter"), "splitter")
        component("sampler", spec.sampler, "sampler")
    stages = []
    for name, stage in spec.stages.items():
        if not stage.enabled:
            continue
        at = f"stages.{name}"
        splitter = component("splitter", stage.splitter, f"{at}.splitter")
        splitter_groups(splitter, f"{at}.splitter")
        sampler = component("sampler", stage.sampler, f"{at}.sampler")
        losses = {}
        for loss_name, loss in stage.losses.items():
            resolved = component("loss", loss, f"{at}.losses.{loss_name}")
            if resolved is not None and getattr(resolved.options, "enabled", True):
                losses[loss_name] = resolved
        if not losses and not any(p.startswith(f"{at}.losses") for p in problems):
            problems.append(f"{at}.losses: no enabled loss terms; the stage would train nothing")
        optim = {}
        default = stage.optim.get("default", OptimSpec())
        for phase, opt in stage.optim.items():
            optim[phase] = default.model_copy(update={f: getattr(opt, f) for f in opt.model_fields_set})
        if splitter and sampler:
            groups = tuple(stage.groups or spec.groups)
            stages.append(ResolvedStage(name, stage, groups, splitter, sampler, losses, optim))
    problems = [_inherited(p, raw) for p in problems]
    if problems:
        raise ConfigError(_report(source, problems))
    assert model and task and data
    return ResolvedExperiment(spec, source, model, task, data, stages, plugins, raw)


def json_schema(plugins: PluginSet | None = None) -> dict[str, Any]:
    """JSON schema of experiment files, with every registered plugin's options attached."""
    plugins = plugins or default_plugins()
    schema = Experiment.model_json_schema()
    # read before validation (``read_toml`` merges the base in), so not a model field
    schema["properties"]["extends"] = {
        "type": "string",
        "title": "Extends",
        "description": "path of a base experiment (relative to this file); this file's keys override it",
    }
    per_kind: dict[str, dict[str, Any]] = {}
    for entry in plugins.registry:
        options = getattr(entry.obj, "Options", PluginOptions)
        per_kind.setdefault(entry.kind, {})[entry.name] = options.model_json_schema()
    schema["x-branchadapt-plugins"] = per_kind
    return schema
