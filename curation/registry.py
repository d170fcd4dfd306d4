"""Step names used in pipeline YAML, mapped to their classes (imported lazily).

Lazy imports keep `refinery --help` fast and let a missing optional dependency fail when the
step is built, with the step's name in the message, not deep inside a run. A name written
`package.module:ClassName` is a third-party step: imported from wherever Python finds it (it
must be importable on every worker too), checked to be the right kind of step, then treated as
a built-in one.

Any step spec may also carry `resources: {cpus, gpus, memory_gb}`, what one task running it
needs; a step class declares its defaults in `resources`. `phase_resources` is what a phase's
tasks ask the executor for: the max over the phase's steps.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Iterable
from typing import Any

from curation.param_types import param_error, param_hints


class StepTable(dict[str, str]):
    """Step names → `module:Class`, plus the base class (`module:Class`) a third-party step of
    this kind must subclass and what the kind is called in messages."""

    def __init__(self, entries: dict[str, str], base: str, kind: str) -> None:
        super().__init__(entries)
        self.base = base
        self.kind = kind


# Readers: one input file → Documents. The first step of every phase-1 task.
READERS = StepTable({
    "warc": "curation.read.warc:WarcReader",
    "dolma": "curation.read.dolma:DolmaReader",
    "parquet": "curation.read.parquet:ParquetReader",
    "hf_dataset": "curation.read.hf_dataset:HfDatasetReader",
}, base="curation.read.base:Reader", kind="reader")

# Per-document steps, in the order a config usually lists them.
DOC_STEPS = StepTable({
    "extract": "curation.extract:Extract",
    "url_filter": "curation.filters.url:UrlFilter",
    "line_modifiers": "curation.filters.line_modifiers:LineModifiers",
    "gopher_quality": "curation.filters.gopher_quality:GopherQualityFilter",
    "gopher_repetition": "curation.filters.gopher_repetition:GopherRepetitionFilter",
    "c4": "curation.filters.c4:C4Filter",
    "fineweb": "curation.filters.fineweb:FineWebFilter",
    "language": "curation.filters.language:LanguageFilter",
    "pii": "curation.pii:PiiMasker",
    "classify": "curation.classify:ClassifyTagger",
}, base="curation.step:Step", kind="document step")

# Global steps: annotate per shard, then decide across all shards.
DEDUP_STEPS = StepTable({
    "dedup_exact": "curation.dedup.exact:ExactDedup",
    "dedup_minhash": "curation.dedup.minhash:MinHashDedup",
}, base="curation.dedup.cluster:DedupStep", kind="dedup step")

# `package.module:ClassName`: how a third-party step is named in YAML.
_IMPORT_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
# What a step spec's `resources:` may hold (per task: CPUs, GPUs, GB of memory).
RESOURCE_KEYS = ("cpus", "gpus", "memory_gb")


class ConfigError(ValueError):
    """A pipeline or training config that cannot be run as written."""


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def is_import_name(name: str) -> bool:
    """True for a third-party step named `package.module:ClassName`."""
    return _IMPORT_NAME.fullmatch(name) is not None


def is_known(name: str, table: dict[str, str]) -> bool:
    """A name a config may use in `table`'s section: a built-in one or a third-party import."""
    return name in table or is_import_name(name)


def resolve(name: str, table: dict[str, str]) -> type:
    if name in table:
        module, _, cls = table[name].partition(":")
        try:
            return getattr(importlib.import_module(module), cls)
        except ImportError as e:  # a missing optional dependency: say which step needs it
            raise ConfigError(f"step {name!r} cannot be built: {e}") from e
    if is_import_name(name):
        return _import_step(name, table)
    raise ConfigError(f"unknown step {name!r}{_suggest(name, list(table))}; known: {', '.join(table)} "
                      "(or name your own step class as package.module:ClassName)")


def _import_step(name: str, table: dict[str, str]) -> type:
    """The class a `package.module:ClassName` name points at, checked to be a step of the table's kind."""
    module_name, _, cls_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"step {name!r}: module {module_name!r} not found; install its package or add "
                              "its folder to PYTHONPATH (on every worker, for a Ray cluster)") from e
        raise ConfigError(f"step {name!r} cannot be built: {e}") from e
    except Exception as e:  # noqa: BLE001 - any error while importing user code, as one line
        raise ConfigError(f"step {name!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    cls = getattr(module, cls_name, None)
    if cls is None:
        found = [n for n, v in vars(module).items() if inspect.isclass(v)]
        raise ConfigError(f"step {name!r}: module {module_name!r} has no class {cls_name!r}"
                          f"{_suggest(cls_name, found)}")
    base_path = getattr(table, "base", None)
    if base_path is not None:
        base_module, _, base_name = base_path.partition(":")
        base = getattr(importlib.import_module(base_module), base_name)
        if not (inspect.isclass(cls) and issubclass(cls, base)):
            kind = getattr(table, "kind", "step")
            raise ConfigError(f"step {name!r} is not a {kind}: {cls_name} must subclass "
                              f"{base_module}.{base_name}")
    return cls


def check_params(name: str, params: dict[str, Any] | None, table: dict[str, str], label: str = "") -> type:
    """Resolve a step and check its parameters without building it: names against the
    constructor's signature, values against its type hints, then the step's own
    `validate_params(params)` hook if it has one (it raises ValueError naming the parameter).
    `label` names the step in a wrong type's message (default: step `name`)."""
    cls = resolve(name, table)
    params = params or {}
    sig = inspect.signature(cls.__init__)
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    valid = [p for p in sig.parameters if p != "self"]
    if not accepts_kwargs:
        for key in params:
            if key not in valid:
                raise ConfigError(
                    f"step {name!r} has no parameter {key!r}{_suggest(key, valid)}; valid: {', '.join(valid)}"
                )
    hints = param_hints(cls)
    for key, value in params.items():
        problem = param_error(value, hints[key]) if key in hints else None
        if problem:
            raise ConfigError(f"{label or f'step `{name}`'}: parameter `{key}` {problem}")
    hook = getattr(cls, "validate_params", None)
    if hook is not None:
        try:
            hook(params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"step `{name}`: {e}") from e
    return cls


def build(name: str, params: dict[str, Any] | None, table: dict[str, str]) -> Any:
    """Instantiate a step, turning unknown parameters into an error that names them."""
    cls = check_params(name, params, table)
    params = dict(params or {})
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"step {name!r}: {e}") from e


def check_resources(value: Any, where: str) -> dict[str, float]:
    """A spec's `resources:` mapping, checked: known keys, non-negative numbers."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: `resources` must be a mapping such as {{cpus: 1, gpus: 0, memory_gb: 2}}")
    out: dict[str, float] = {}
    for key, amount in value.items():
        if key not in RESOURCE_KEYS:
            raise ConfigError(f"{where}: unknown resource {key!r}{_suggest(str(key), list(RESOURCE_KEYS))}; "
                              f"valid: {', '.join(RESOURCE_KEYS)}")
        if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
            raise ConfigError(f"{where}: resource `{key}` must be a number >= 0, got {amount!r}")
        out[key] = amount
    return out


def step_resources(name: str, resources: dict[str, float] | None = None) -> dict[str, float]:
    """What one task running step `name` needs: its class's defaults, overridden by the config."""
    cls = resolve(name, _table_of(name))
    return {**getattr(cls, "resources", {}), **(resources or {})}


def phase_resources(specs: Iterable[Any]) -> dict[str, float]:
    """What one task running all `specs` (objects with `name` and `resources`) asks for: the max of
    each resource over the steps; an empty dict when no step asks for anything (executor default)."""
    out: dict[str, float] = {}
    for spec in specs:
        for key, amount in step_resources(spec.name, getattr(spec, "resources", None)).items():
            out[key] = max(out.get(key, 0), amount)
    return out


def _table_of(name: str) -> dict[str, str]:
    for table in (READERS, DOC_STEPS, DEDUP_STEPS):
        if name in table:
            return table
    return {}  # a third-party name: imported as written (its kind was checked when the config loaded)


def build_reader(spec: Any, source: str, added: str, cache_dir: str | None) -> Any:
    """The config's reader (`spec`: name and params), with what the pipeline gives every reader:
    the config's `source`, the run's `added` time and the download cache."""
    return build(spec.name, {**spec.params, "source": source, "added": added, "cache_dir": cache_dir}, READERS)
