"""Step names used in pipeline YAML, mapped to their classes (imported lazily).

Lazy imports keep `refinery --help` fast and let a missing optional dependency fail when the
step is built, with the step's name in the message, not deep inside a run.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from curation.param_types import param_error, param_hints

# Per-document steps, in the order a config usually lists them.
DOC_STEPS: dict[str, str] = {
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
}

# Global steps: annotate per shard, then decide across all shards.
DEDUP_STEPS: dict[str, str] = {
    "dedup_exact": "curation.dedup.exact:ExactDedup",
    "dedup_minhash": "curation.dedup.minhash:MinHashDedup",
}


class ConfigError(ValueError):
    """A pipeline or training config that cannot be run as written."""


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve(name: str, table: dict[str, str]) -> type:
    if name not in table:
        raise ConfigError(f"unknown step {name!r}{_suggest(name, list(table))}; known: {', '.join(table)}")
    module, _, cls = table[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:  # a missing optional dependency: say which step needs it
        raise ConfigError(f"step {name!r} cannot be built: {e}") from e


def check_params(name: str, params: dict[str, Any] | None, table: dict[str, str]) -> type:
    """Resolve a step and check its parameters without building it: names against the
    constructor's signature, values against its type hints, then the step's own
    `validate_params(params)` hook if it has one (it raises ValueError naming the parameter)."""
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
            raise ConfigError(f"step `{name}`: parameter `{key}` {problem}")
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
