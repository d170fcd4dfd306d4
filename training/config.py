"""Training configuration: typed sections loaded from YAML plus dotted command-line overrides.

Strict on purpose: a misspelled key (``optim.lr_warmup`` for ``optim.warmup``) is an error that
names the key and suggests the closest valid one, because a silently ignored key is a silently
wrong run. Override values arrive as strings and are coerced to the field's declared type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from training.objectives import ENGINE_SECTIONS, STAGE_OBJECTIVES, STAGE_SECTIONS, resolve

# Every stage the engine runs (training/objectives/__init__.py maps each to its objective).
STAGES = tuple(STAGE_OBJECTIVES)


class ConfigError(ValueError):
    """A configuration key or value that cannot be accepted."""


@dataclass
class ModelSection:
    """Architecture. ``size`` picks a named config; explicit fields override it.

    In mid-training every field left unset is taken from the ``init_from`` checkpoint; the
    architecture must match it, only ``max_seq_len``, ``rope_theta`` and ``rope_scaling`` may change
    (context extension).
    """

    size: str | None = None
    vocab_size: int | None = None  # None: the tokenizer's vocabulary size from the data manifest
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_hidden: int | None = None
    max_seq_len: int | None = None
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    norm_eps: float | None = None
    tie_embeddings: bool | None = None
    init_std: float | None = None


@dataclass
class DataSection:
    """Training data (a mix manifest or a single token manifest) and held-out evaluation data."""

    mix: str = ""
    eval: str | None = None  # token manifest of held-out text; None disables evaluation
    seq_len: int = 256
    eval_seq_len: int | None = None  # None: same as seq_len


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule (see training/schedule.py for the exact shapes)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup: int = 100  # optimizer steps of linear warmup
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent decaying
    decay_shape: Literal["linear", "1-sqrt"] = "linear"  # wsd decay shape
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclass
class TrainSection:
    """Run length, batch, logging, checkpoints, precision and parallelism."""

    steps: int = 1000
    batch_size: int = 32  # sequences per micro-batch, summed over all ranks
    seed: int = 0
    eval_every: int = 0  # optimizer steps between evaluations; 0: only at the end
    eval_batches: int = 20
    eval_batch_size: int | None = None  # None: batch_size
    eval_at_start: bool = False  # evaluate before the first step (mid-training's baseline)
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    out_dir: str = "runs/train"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    init_from: str | None = None  # mid-training: checkpoint (run dir, checkpoints dir or step dir)
    resume: bool = True  # continue from out_dir's latest checkpoint when there is one
    export_hf: bool = True  # write out_dir/hf at the end
    progress: bool = True  # tqdm bar on rank 0
    device: str | None = None  # None: cuda:LOCAL_RANK when available, else cpu
    stop_after: int | None = None  # end this job after that step, with a checkpoint; a rerun resumes


@dataclass
class TrainConfig:
    stage: str = "pretrain"  # one of STAGES
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    # Stage sections given in the YAML or overrides (sft, dpo, lora, ...), by name; see STAGE_SECTIONS.
    sections: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> Any:
        """The stage section ``name``: the one given, else its defaults."""
        if name not in self.sections:
            return _stage_section_type(name)()
        return self.sections[name]

    def has_section(self, name: str) -> bool:
        return name in self.sections

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        d.update(d.pop("sections"))  # written as in the YAML: one top-level mapping per section
        return d

    def validate(self) -> None:
        """Cross-field checks that a single field's type cannot express."""
        t, o, d = self.train, self.optim, self.data
        positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "data.seq_len": d.seq_len,
                    "optim.grad_accum": o.grad_accum, "train.log_every": t.log_every,
                    "train.keep_checkpoints": t.keep_checkpoints, "train.eval_batches": t.eval_batches}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        for key, value in {"optim.warmup": o.warmup, "train.eval_every": t.eval_every,
                           "train.checkpoint_every": t.checkpoint_every}.items():
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        for key, opt in {"train.eval_batch_size": t.eval_batch_size, "data.eval_seq_len": d.eval_seq_len,
                         "train.stop_after": t.stop_after}.items():
            # A negative eval batch size would silently yield no evaluation batches at all.
            if opt is not None and opt <= 0:
                raise ConfigError(f"{key} must be > 0 or null, got {opt}")
        if o.warmup >= t.steps and o.schedule != "constant":
            raise ConfigError(f"optim.warmup={o.warmup} leaves no decay in train.steps={t.steps}; lower "
                              f"optim.warmup or raise train.steps")
        for name in SECTIONS:  # a config built in code skips _coerce: nan would pass every check below
            for f in dataclasses.fields(getattr(self, name)):
                value = getattr(getattr(self, name), f.name)
                for v in value if isinstance(value, tuple) else (value,):
                    if isinstance(v, float) and not math.isfinite(v):
                        raise ConfigError(f"{name}.{f.name} must be a finite number, got {value!r}")
        if o.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
        if o.eps <= 0:
            raise ConfigError(f"optim.eps must be > 0, got {o.eps}")
        if o.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        if o.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be > 0, or 0 to disable clipping, got {o.grad_clip}")
        if not all(0.0 <= b < 1.0 for b in o.betas):
            raise ConfigError(f"optim.betas must both be in [0, 1), got {list(o.betas)}")
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        if not 0.0 <= o.decay_fraction <= 1.0:
            raise ConfigError(f"optim.decay_fraction must be in [0, 1], got {o.decay_fraction}")
        if not d.mix:
            raise ConfigError("data.mix is required: a mix manifest or a token manifest path")
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")
        objective = _objective_type(self.stage)
        for name in self.sections:
            if name not in objective.sections and name not in ENGINE_SECTIONS:
                raise ConfigError(f"section '{name}' is not used by stage '{self.stage}'; remove it")
        if objective.requires_init_from and not t.init_from:
            raise ConfigError(f"stage '{self.stage}' requires train.init_from (the checkpoint to fine-tune)")
        objective.validate_config(self)
        lora = self.sections.get("lora")
        if lora is not None and getattr(lora, "quantize", "none") != "none" and t.parallel == "fsdp":
            raise ConfigError("QLoRA (lora.quantize) cannot be sharded with train.parallel=fsdp: 4-bit weights "
                              "are not DTensors; use train.parallel=ddp")
        if self.stage == "midtrain" and not t.init_from:
            raise ConfigError("stage 'midtrain' requires train.init_from (a pretraining checkpoint)")
        if self.model.size is None and self.model.dim is None and not t.init_from:
            raise ConfigError("model.size (e.g. '10m') or explicit model dims are required, unless "
                              "train.init_from gives a checkpoint to continue from")


SECTIONS: dict[str, type] = {"model": ModelSection, "data": DataSection, "optim": OptimSection,
                             "train": TrainSection}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _all_dotted_keys() -> list[str]:
    keys = ["stage"]
    for name, cls in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _stage_section_type(name: str) -> type:
    """The dataclass of stage section ``name``, imported from the module that owns it."""
    try:
        return resolve(STAGE_SECTIONS[name])
    except ImportError as e:
        raise ConfigError(f"config section '{name}' is not available: {e}") from None


def _objective_type(stage: str) -> Any:
    try:
        return resolve(STAGE_OBJECTIVES[stage])
    except ImportError as e:
        raise ConfigError(f"stage '{stage}' is not available: {e}") from None


def _parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` whose syntax errors name the file or override and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}; fix the syntax (e.g. close every "
                          f"bracket and quote)") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce ``value`` (from YAML or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot accept {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key} must be a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = float("nan")
            if f.is_integer():
                return int(f)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if not math.isfinite(number):  # no field means anything by nan or inf; nan passes every `<=` check
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = _parse_yaml(value if value.startswith("[") else f"[{value}]", key)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        if isinstance(value, str):  # an override: "[q_proj, v_proj]" or "q_proj,v_proj"
            value = _parse_yaml(value if value.strip().startswith("[") else f"[{value}]", key)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = _parse_yaml(value, key)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a bug in this module, not in the input


def _section_from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}.{key}'{_suggest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from nested plain data; unknown keys are errors with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"a training config must be a mapping, got {type(data).__name__}")
    sections: dict[str, Any] = {}
    stage = "pretrain"
    for key, value in data.items():
        if key == "stage":
            stage = _coerce(value, typing.get_type_hints(TrainConfig)["stage"], "stage")
            continue
        if key not in SECTIONS and key not in STAGE_SECTIONS:
            valid = [*SECTIONS, *STAGE_SECTIONS, "stage"]
            raise ConfigError(f"unknown config section '{key}'{_suggest(key, valid)}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{key}' must be a mapping, got {value!r}")
        cls = SECTIONS[key] if key in SECTIONS else _stage_section_type(key)
        sections[key] = _section_from_dict(cls, value, key)
    stage_sections = {k: sections.pop(k) for k in list(sections) if k in STAGE_SECTIONS}
    return TrainConfig(stage=stage, **sections, sections=stage_sections)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``section.key=value`` strings; values are parsed and coerced to the field's type."""
    valid = _all_dotted_keys()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        section_name = key.split(".", 1)[0]
        if section_name in STAGE_SECTIONS and "." in key:
            _override_stage_section(cfg, section_name, key, raw, item)
            continue
        if key not in valid:
            raise ConfigError(f"unknown config key '{key}' in override {item!r}{_suggest(key, valid)}")
        if key == "stage":
            cfg.stage = _coerce(raw, typing.get_type_hints(TrainConfig)["stage"], key)
            continue
        section_name, name = key.split(".", 1)
        section = getattr(cfg, section_name)
        tp = typing.get_type_hints(type(section))[name]
        # YAML parses lists, mappings and null; scalars stay strings so coercion decides their type.
        parsed: Any = raw
        if raw.strip()[:1] in ("[", "{"):
            parsed = _parse_yaml(raw, f"override {item!r}")
        setattr(section, name, _coerce(parsed, tp, key))
    return cfg


def _override_stage_section(cfg: TrainConfig, section_name: str, key: str, raw: str, item: str) -> None:
    cls = _stage_section_type(section_name)
    name = key.split(".", 1)[1]
    names = [f.name for f in dataclasses.fields(cls)]
    if name not in names:
        raise ConfigError(f"unknown config key '{key}' in override {item!r}"
                          f"{_suggest(name, names)}")
    section = cfg.sections.setdefault(section_name, cls())
    parsed: Any = _parse_yaml(raw, f"override {item!r}") if raw.strip()[:1] in ("[", "{") else raw
    setattr(section, name, _coerce(parsed, typing.get_type_hints(cls)[name], key))


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                stage: str | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = _parse_yaml(p.read_text(), str(p)) or {}
    cfg = config_from_dict(data)
    if stage is not None:
        if stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {stage!r}")
        if "stage" in data and data["stage"] != stage:
            raise ConfigError(f"{path} is a {data['stage']!r} config but the command asked for {stage!r}")
        cfg.stage = stage  # type: ignore[assignment]
    apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg
