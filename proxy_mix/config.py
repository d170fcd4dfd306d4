"""The mixing config: one YAML file for pools, targets, the proxy sweep, the fit, upsampling and validation.

Every section is a small dataclass whose fields are the accepted keys; an unknown key is an error
that names the closest valid one. Relative paths are read from the working directory, as in the
training configs. See docs/mixing.md for a commented example.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class MixConfigError(ValueError):
    """A mixing config, mixture or pool that cannot be used as written; the message says what to change."""


@dataclass
class WebSection:
    """Classified web documents, split into topic × quality-bucket pools."""

    corpus: list[str] = field(default_factory=list)  # curated corpus dirs or document files
    # Classifier directories (`refinery classify train`), used for documents without the attributes.
    quality_model: str | None = None
    topic_model: str | None = None
    buckets: int = 3  # quality buckets per topic, cut at quantiles of that topic's scores
    # Pool topic -> classifier labels it gathers (e.g. science: [sci_tech, math, cs]); None: one per label.
    # Documents whose label no topic lists are counted as unassigned and left out.
    topics: dict[str, list[str]] | None = None
    sample: int = 10_000  # documents per topic in the reservoir sample that sets the bucket edges
    max_documents: int | None = None  # read at most this many documents (a quick look at a big corpus)


@dataclass
class SourceSection:
    """A named pool of other clean text: reference text, arXiv abstracts, code."""

    name: str = ""
    paths: list[str] = field(default_factory=list)  # files or dirs; `stdlib` = Python's standard library
    format: Literal["auto", "documents", "text", "code", "csv"] = "auto"
    chunk_chars: int = 4000  # plain text is cut at paragraph breaks into documents of about this size
    text_column: str = "abstract"  # csv: the column holding the text (`title` is prepended if present)
    max_documents: int | None = None
    max_bytes: int | None = None  # stop reading once this many UTF-8 bytes of text were taken


@dataclass
class TargetSection:
    """A target set the proxies are evaluated on: a pool's held-out slice, or text files."""

    name: str = ""
    pool: str | None = None  # held-out documents of this pool
    paths: list[str] | None = None  # or: files read like a source's (text, documents, csv, code)
    format: Literal["auto", "documents", "text", "code", "csv"] = "auto"
    max_bytes: int | None = None


@dataclass
class SweepSection:
    """K proxy models, one per Dirichlet-sampled mixture (RegMix), each a fixed token budget."""

    proxies: int = 32
    seed: int = 0
    # A named size of training/model.py, or explicit dims ({dim: 192, n_layers: 6, n_heads: 6, ...}).
    model: str | dict[str, int] = "1m"
    tokens: int = 2_000_000  # training tokens per proxy
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    # Dirichlet concentration = scale · natural share · pools, scale log-uniform in this range:
    # small scales give sparse mixtures, large ones stay near the natural distribution (RegMix §3).
    concentration: tuple[float, float] = (0.1, 5.0)
    # The Dirichlet's mean is natural^temperature (normalized): 1 is RegMix's natural distribution,
    # lower values give small pools (a code or reference source) more of the proxies' weight.
    temperature: float = 1.0
    max_repetition: float = 4.0  # epochs a proxy may take of any pool (Olmix: 4-7×)
    eval_batches: int = 16  # batches of seq_len windows per target set
    cpus_per_proxy: int = 1
    gpus_per_proxy: float = 0.0
    keep_checkpoints: bool = False  # proxies' checkpoints are deleted once their losses are written


@dataclass
class FitSection:
    """Regressions from mixture weights to target loss, and the search of the simplex."""

    targets: list[str] | None = None  # the objective: mean bits per byte over these (None: all targets)
    model: Literal["auto", "lightgbm", "loglinear", "linear"] = "auto"  # auto: best k-fold Spearman
    # per_target: one regressor per target, the objective their mean (fit.TargetMean); direct: one
    # regressor on the mean itself (ranks worse: a sum of per-target laws is not one law)
    combine: Literal["per_target", "direct"] = "per_target"
    folds: int = 5
    candidates: int = 100_000  # sampled mixtures scored by the fitted model
    top_k: int = 100  # the searched mixture is the average of the best top_k candidates (RegMix)
    budget_tokens: int | None = None  # the planned run's tokens (caps); None: one epoch of every pool
    max_repetition: float = 4.0  # epochs of any pool the planned run may take
    seed: int = 0


@dataclass
class UpsampleSection:
    """Quality-aware upsampling per topic (OLMo 3 / Olmix): drop the bottom, repeat the top."""

    mix: str | None = None  # mixture giving each topic's share; None: the searched one, else natural
    drop_bottom: float = 0.4  # share of each topic's quality buckets dropped, lowest first
    max_repetition: float = 7.0  # epochs of the best bucket
    curve: Literal["linear", "exponential"] = "exponential"  # repetition from the lowest kept bucket up
    budget_tokens: int | None = None  # None: fit.budget_tokens


@dataclass
class ValidateSection:
    """A model larger than the proxies, at equal tokens, on the searched, natural and uniform mixtures."""

    model: str | dict[str, int] = "10m"  # larger than the proxies: a named size or explicit dims
    tokens: int = 10_000_000
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    mixtures: list[str] = field(default_factory=lambda: ["searched", "natural", "uniform", "upsampled"])
    max_repetition: float = 4.0
    eval_batches: int = 32
    cpus_per_run: int = 1
    gpus_per_run: float = 0.0


@dataclass
class MixConfig:
    name: str = "mix"
    output: str = "runs/mix"
    tokenizer: str = ""
    holdout: float = 0.02  # share of every pool's documents held out (by a hash of the document)
    web: WebSection | None = None
    sources: list[SourceSection] = field(default_factory=list)
    targets: list[TargetSection] = field(default_factory=list)
    sweep: SweepSection = field(default_factory=SweepSection)
    fit: FitSection = field(default_factory=FitSection)
    upsample: UpsampleSection = field(default_factory=UpsampleSection)
    validate: ValidateSection = field(default_factory=ValidateSection)

    @property
    def out(self) -> Path:
        """The output directory, absolute: Ray workers need not share the driver's working directory."""
        return Path(self.output).resolve()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, *keys: str) -> str:
        """Hash of the named top-level keys (all when none), to refuse resuming with other settings."""
        d = self.to_dict()
        part = {k: d[k] for k in keys} if keys else d
        return hashlib.sha1(json.dumps(part, sort_keys=True, default=str).encode()).hexdigest()[:16]


_SECTIONS: dict[str, type] = {"web": WebSection, "sweep": SweepSection, "fit": FitSection,
                              "upsample": UpsampleSection, "validate": ValidateSection}
_LISTS: dict[str, type] = {"sources": SourceSection, "targets": TargetSection}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f"; valid: {', '.join(valid)}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except MixConfigError:
                continue
        raise MixConfigError(f"{key}: {value!r} is not {' or '.join(_describe(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise MixConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise MixConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise MixConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise MixConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise MixConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise MixConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        if isinstance(value, str):  # one path where a list is expected
            value = [value]
        if not isinstance(value, list):
            raise MixConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MixConfigError(f"{key} must be a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    raise MixConfigError(f"{key}: unsupported field type {tp!r}")  # a bug here, not in the input


def _describe(tp: Any) -> str:
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _section(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MixConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise MixConfigError(f"unknown key '{where}.{key}'{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def config_from_dict(raw: Any, where: str = "config") -> MixConfig:
    if not isinstance(raw, dict):
        raise MixConfigError(f"{where}: expected a mapping at the top level")
    hints = typing.get_type_hints(MixConfig)
    names = [f.name for f in dataclasses.fields(MixConfig)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            raise MixConfigError(f"{where}: unknown key '{key}'{_suggest(str(key), names)}")
        if key in _SECTIONS:
            kwargs[key] = _section(_SECTIONS[key], value, key)
        elif key in _LISTS:
            if not isinstance(value, list):
                raise MixConfigError(f"{where}: '{key}' must be a list of mappings")
            kwargs[key] = [_section(_LISTS[key], v, f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[key] = _coerce(value, hints[key], key)
    cfg = MixConfig(**kwargs)
    validate(cfg)
    return cfg


def load_config(path: str | Path) -> MixConfig:
    p = Path(path)
    if not p.is_file():
        raise MixConfigError(f"mixing config not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise MixConfigError(f"{p}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    return config_from_dict(raw or {}, where=str(p))


def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise MixConfigError(f"{what} name {name!r} must start with a letter or digit and hold only letters, "
                             "digits, '_', '.', '-' (it names a folder)")


def validate(cfg: MixConfig) -> None:
    """Cross-field checks: names, positive sizes, references between sections."""
    if not cfg.tokenizer:
        raise MixConfigError("tokenizer is required: the tokenizer.json every pool is tokenized with "
                             "(`refinery tokenizer train`)")
    if not 0.0 < cfg.holdout < 0.5:
        raise MixConfigError(f"holdout must be in (0, 0.5), got {cfg.holdout}")
    if cfg.web is None and not cfg.sources:
        raise MixConfigError("no pools: give a `web` section (classified corpus), `sources`, or both")
    if cfg.web is not None:
        w = cfg.web
        if not w.corpus:
            raise MixConfigError("web.corpus is empty: list the curated corpus directories or files")
        if w.buckets < 1 or w.sample < w.buckets:
            raise MixConfigError(f"web.buckets must be >= 1 and web.sample >= buckets, got {w.buckets}, {w.sample}")
        for topic, labels in (w.topics or {}).items():
            _check_name(topic, "web topic")
            if not labels:
                raise MixConfigError(f"web.topics.{topic} lists no classifier labels")
        if w.topics:
            seen: dict[str, str] = {}
            for topic, labels in w.topics.items():
                for lab in labels:
                    if lab in seen:
                        raise MixConfigError(f"label {lab!r} is in web.topics.{seen[lab]} and web.topics.{topic}")
                    seen[lab] = topic
    names = []
    for i, s in enumerate(cfg.sources):
        if not s.name:
            raise MixConfigError(f"sources[{i}] needs a name")
        _check_name(s.name, "source")
        if not s.paths:
            raise MixConfigError(f"source {s.name!r} lists no paths")
        if s.chunk_chars < 100:
            raise MixConfigError(f"source {s.name!r}: chunk_chars must be >= 100, got {s.chunk_chars}")
        names.append(s.name)
    if len(set(names)) != len(names):
        raise MixConfigError(f"source names must be unique, got {names}")
    if not cfg.targets:
        raise MixConfigError("no targets: list the sets the proxies are evaluated on (a pool's held-out slice "
                             "with `pool: NAME`, or `paths:` of text)")
    tnames = []
    for i, t in enumerate(cfg.targets):
        if not t.name:
            raise MixConfigError(f"targets[{i}] needs a name")
        _check_name(t.name, "target")
        if (t.pool is None) == (t.paths is None):
            raise MixConfigError(f"target {t.name!r}: give exactly one of `pool` (a pool's held-out slice) or "
                                 "`paths` (text files)")
        tnames.append(t.name)
    if len(set(tnames)) != len(tnames):
        raise MixConfigError(f"target names must be unique, got {tnames}")
    s = cfg.sweep
    for key, value in {"sweep.proxies": s.proxies, "sweep.tokens": s.tokens, "sweep.seq_len": s.seq_len,
                       "sweep.batch_size": s.batch_size, "sweep.eval_batches": s.eval_batches,
                       "sweep.cpus_per_proxy": s.cpus_per_proxy, "fit.folds": cfg.fit.folds,
                       "fit.candidates": cfg.fit.candidates, "fit.top_k": cfg.fit.top_k,
                       "validate.tokens": cfg.validate.tokens, "validate.seq_len": cfg.validate.seq_len,
                       "validate.batch_size": cfg.validate.batch_size}.items():
        if value <= 0:
            raise MixConfigError(f"{key} must be > 0, got {value}")
    if not 0.0 < s.temperature <= 1.0:
        raise MixConfigError(f"sweep.temperature must be in (0, 1], got {s.temperature}")
    lo, hi = s.concentration
    if not 0 < lo <= hi:
        raise MixConfigError(f"sweep.concentration must be [low, high] with 0 < low <= high, got {[lo, hi]}")
    for key, rep in {"sweep.max_repetition": s.max_repetition, "fit.max_repetition": cfg.fit.max_repetition,
                     "upsample.max_repetition": cfg.upsample.max_repetition,
                     "validate.max_repetition": cfg.validate.max_repetition}.items():
        if rep <= 0:
            raise MixConfigError(f"{key} must be > 0, got {rep}")
    if cfg.fit.folds < 2:
        raise MixConfigError(f"fit.folds must be >= 2, got {cfg.fit.folds}")
    if cfg.fit.top_k > cfg.fit.candidates:
        raise MixConfigError(f"fit.top_k ({cfg.fit.top_k}) exceeds fit.candidates ({cfg.fit.candidates})")
    for t in cfg.fit.targets or []:
        if t not in tnames:
            raise MixConfigError(f"fit.targets names {t!r}, which is not a target set; targets: {tnames}")
    if not 0.0 <= cfg.upsample.drop_bottom < 1.0:
        raise MixConfigError(f"upsample.drop_bottom must be in [0, 1), got {cfg.upsample.drop_bottom}")
