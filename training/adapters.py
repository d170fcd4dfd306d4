"""LoRA and QLoRA adapters on our Transformer through PEFT, saved in PEFT's format for HF Llama.

LoRA (Hu et al. 2021, eq. 3): a frozen linear map W gets a trainable low-rank update,

    h = W x + (alpha / r) · B A x,     A ∈ R^{r×in} (Kaiming-uniform), B ∈ R^{out×r} (zeros),

so training starts from the base model exactly and only r·(in + out) numbers per targeted matrix
learn. QLoRA (Dettmers et al. 2023) stores W in 4-bit NormalFloat (NF4, blocks of 64 with an absmax
each, the absmaxes quantized again: "double quantization") and dequantizes it on the fly; gradients
flow through the dequantized W into A and B only.

The layers are PEFT's (`peft.inject_adapter_in_model`), injected into our `Transformer` in place,
so the model keeps its type, its forward and its HF-Llama parameter names; targets are chosen by
module name (`q_proj`, ..., `down_proj`, see training/model.py). On disk an adapter is what
`peft.PeftModel.save_pretrained` writes for a `LlamaForCausalLM` (`adapter_config.json` +
`adapter_model.safetensors`, keys `base_model.model.model.layers.N....lora_A.weight`), so
`PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(<our HF export>), <adapter dir>)` gives
our outputs, and a PEFT adapter trained on a HF Llama loads onto our imported copy of it.

Distributed: apply adapters *before* DDP / FSDP2 / compile wrap the model. DDP reduces only the
parameters that require grad. FSDP2 (`fully_shard`) shards frozen and trainable parameters of a
block together and keeps `requires_grad` per parameter, so LoRA needs nothing more; the optimizer
must be built over the trainable parameters only (`trainable_parameters`). QLoRA's packed
`Params4bit` cannot be sharded by FSDP2 (its quant state is not a DTensor): QLoRA runs in one
process or with DDP (each rank holds the whole 4-bit base, which is the point of QLoRA anyway).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from training.atomic import atomic_write, atomic_write_text
from training.config import ConfigError

if TYPE_CHECKING:
    from training.model import Transformer

__all__ = [
    "AdapterError", "LoRASection", "DEFAULT_TARGETS", "apply_lora", "apply_qlora", "apply_adapters",
    "has_adapters", "trainable_parameters", "parameter_counts", "adapter_summary", "adapter_state_dict",
    "save_adapter", "export_adapters", "load_adapter", "merge_adapter", "load_base_model", "merge_to_hf",
]

# Every linear map of a Llama block (QLoRA paper §4: adapting all of them is what matches full
# fine-tuning; attention-only LoRA falls short).
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # PEFT's name for a model's single adapter
PEFT_PREFIX = "base_model.model."  # what PeftModel's wrapping adds in front of the HF module names
# Top-level modules of HF's Llama*For* classes (LM head, sequence-classification head); every other
# module lives under the backbone, `model.` (our names are HF's without that prefix).
_HF_HEADS = ("lm_head", "score")
_TRAINED_HEADS = ("score",)  # heads that are new at fine-tuning time, so always trained with the adapter
_NF4_BLOCK = 64  # bitsandbytes' default NF4 block size, as in the QLoRA paper


class AdapterError(ConfigError):
    """An adapter setting, file or model that does not fit (a ConfigError: the CLI prints it in one line)."""


@dataclass
class LoRASection:
    """The `lora:` section of a stage config. Defaults are TRL's (`ModelConfig`: r 16, alpha 32,
    dropout 0.05) with every linear map of a block as target.

    `quantize: nf4` makes it QLoRA: the base linear weights are stored in NF4 (double-quantized when
    `double_quant`) and the adapters train on top. `modules_to_save` names modules trained in full and
    saved with the adapter (a reward model's `score` head, say): PEFT's `modules_to_save`.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    modules_to_save: list[str] = field(default_factory=list)
    quantize: Literal["none", "nf4"] = "none"
    double_quant: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Also called when adapters are applied: command-line overrides set fields after __init__."""
        self.target_modules = _name_list(self.target_modules, "lora.target_modules")
        self.modules_to_save = _name_list(self.modules_to_save, "lora.modules_to_save")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise AdapterError(f"lora.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise AdapterError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise AdapterError("lora.target_modules is empty; name at least one linear module (e.g. q_proj)")
        if self.quantize not in ("none", "nf4"):
            raise AdapterError(f"lora.quantize must be 'none' or 'nf4', got {self.quantize!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoRASection:
        """Strict: an unknown key is an error, not a silently default setting."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise AdapterError(f"unknown lora settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))

    def to_peft(self) -> Any:
        """The equivalent `peft.LoraConfig` (no bias training, PEFT's default initialisation)."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules),
                          modules_to_save=list(self.modules_to_save) or None, bias="none")


def _name_list(value: Any, key: str) -> list[str]:
    """A list of module names from a list or a comma-separated string (a command-line override)."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise AdapterError(f"{key} must be a list of module names, got {value!r}")
    return [v.strip() for v in value if v.strip()]


def _settings(cfg: LoRASection | Mapping[str, Any]) -> LoRASection:
    settings = cfg if isinstance(cfg, LoRASection) else LoRASection.from_dict(cfg)
    settings.validate()
    return settings


def has_adapters(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _check_unwrapped(model: nn.Module) -> None:
    if any(hasattr(model, a) for a in ("_orig_mod", "module")) or type(model).__name__.startswith("FSDP"):
        raise AdapterError(f"apply adapters to the bare model before compile / DDP / FSDP wrap it, "
                           f"not to a {type(model).__name__}")
    if has_adapters(model):
        raise AdapterError("the model already has adapters; merge or rebuild it before adding another")


def _check_targets(model: nn.Module, names: list[str], what: str, linear_only: bool) -> None:
    """Every named target must match at least one module: a typo must not train nothing."""
    leaf_names = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if n}
    linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    for name in names:
        module = leaf_names.get(name)
        if module is None:
            raise AdapterError(f"lora.{what}: no module named {name!r} in the model; linear modules are "
                               f"{', '.join(linears)}")
        if linear_only and not isinstance(module, nn.Linear):
            raise AdapterError(f"lora.{what}: {name!r} is a {type(module).__name__}; LoRA here adapts "
                               f"linear modules only ({', '.join(linears)})")


def apply_lora(model: Transformer, cfg: LoRASection | Mapping[str, Any]) -> Transformer:
    """Freeze `model` and inject LoRA adapters into its target modules, in place; returns it.

    Afterwards only the adapters' A and B matrices (and `modules_to_save`) require grad. With
    `quantize: nf4` in `cfg` this is `apply_qlora`.
    """
    settings = _settings(cfg)
    if settings.quantize != "none":
        return apply_qlora(model, settings)
    return _inject(model, settings)


def _inject(model: Transformer, settings: LoRASection) -> Transformer:
    from peft import inject_adapter_in_model

    _check_unwrapped(model)
    _check_targets(model, settings.target_modules, "target_modules", linear_only=True)
    _check_targets(model, settings.modules_to_save, "modules_to_save", linear_only=False)
    # A scalar head (the reward model's `score`) starts untrained: train it in full, as PEFT does for
    # its sequence-classification task type (it adds `classifier`/`score` to modules_to_save).
    heads = [n for n in _TRAINED_HEADS if isinstance(getattr(model, n, None), nn.Module)
             and n not in settings.target_modules and n not in settings.modules_to_save]
    settings = dataclasses.replace(settings, modules_to_save=[*settings.modules_to_save, *heads])
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(settings.to_peft(), model, adapter_name=ADAPTER_NAME)
    # PEFT marks its own parameters trainable; make sure nothing else slipped through.
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" not in name and "modules_to_save" not in name:
            raise AdapterError(f"base parameter {name} is trainable after injecting adapters")
    return model


def _import_bnb() -> Any:
    # On AVX512-BF16 CPUs bitsandbytes warns at import that an optional hub kernel (`kernels`) is
    # missing; it only speeds up the inference path that NF4Linear turns off.
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops_log.level
    cpu_ops_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # an optional dependency in spirit: name the fix
        raise AdapterError(f"QLoRA needs bitsandbytes (pip install 'bitsandbytes==0.50.2'): {e}") from e
    finally:
        cpu_ops_log.setLevel(level)
    return bnb


@functools.cache
def _nf4_linear_class() -> type:
    """bitsandbytes' Linear4bit that can also *load* its state dict, with one CPU code path.

    Linear4bit saves its packed weight plus the quant state (`weight.absmax`, `weight.quant_map`, ...)
    but has no loader for them, so a checkpoint of a QLoRA model would not load back (the engine
    resumes by `load_state_dict`). Loading takes the stored bits as they are: a resumed run computes
    with exactly the weights it was saved with.
    """
    bnb = _import_bnb()
    from bitsandbytes.functional import QuantState

    class NF4Linear(bnb.nn.Linear4bit):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # bitsandbytes repacks the weight in place, with bf16 scales, the first time an eval-mode
            # forward runs on an AVX512-BF16 CPU (and fails when in_features is not a multiple of 64):
            # evaluation would then compute differently from training and change the state a
            # checkpoint saves. One code path for both keeps results and resume exact.
            self.support_avx512bf16_for_cpu = False

        def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
            key = prefix + "weight"
            mine = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
            stats = {k[len(key) + 1:]: mine.pop(k) for k in list(mine) if k.startswith(key + ".")}
            if key in mine:
                if not stats:
                    raise AdapterError(f"{key}: a 4-bit layer needs its quant state ({key}.absmax, ...); "
                                       f"this state dict holds an unquantized weight")
                weight = self.weight
                weight.data = mine[key].to(weight.device)
                weight.quant_state = QuantState.from_dict(stats, device=weight.device)
                weight.bnb_quantized = True
                self.quant_state = weight.quant_state
                # The weight is loaded; let nn.Module load the bias and report anything else.
                mine[key] = weight
            super()._load_from_state_dict(mine, prefix, *args)

    return NF4Linear


def quantize_linear_nf4(linear: nn.Linear, double_quant: bool = True) -> nn.Module:
    """An NF4 `bitsandbytes.nn.Linear4bit` holding `linear`'s weight (quantized on its device)."""
    bnb = _import_bnb()
    weight = linear.weight
    # On the meta device: the fp weight of the new module would only be thrown away.
    q = _nf4_linear_class()(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=None, compress_statistics=double_quant, quant_type="nf4",
                            device="meta")
    q.weight = bnb.nn.Params4bit(weight.detach(), requires_grad=False,  # quantizing copies, never mutates
                                 compress_statistics=double_quant, quant_type="nf4", blocksize=_NF4_BLOCK)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return q.to(weight.device)  # Params4bit quantizes when it is moved to a device


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_base_nf4(model: nn.Module, keep_full: list[str] | tuple[str, ...] = (),
                      double_quant: bool = True) -> None:
    """Store every linear weight in NF4, in place, except the heads (the LM head is the tied embedding;
    `transformers`' BitsAndBytesConfig skips `lm_head` too) and the modules named in `keep_full`."""
    keep = set(keep_full) | set(_HF_HEADS)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in keep:
            _set_submodule(model, name, quantize_linear_nf4(module, double_quant))
    # PEFT dispatches its bitsandbytes LoRA layer on this flag (set by transformers on HF models).
    model.is_loaded_in_4bit = True


def apply_qlora(model: Transformer, cfg: LoRASection | Mapping[str, Any]) -> Transformer:
    """QLoRA: the base's linear weights in NF4 (`quantize_base_nf4`), then LoRA adapters; in place."""
    settings = dataclasses.replace(_settings(cfg), quantize="nf4")
    _check_unwrapped(model)
    _check_targets(model, settings.target_modules, "target_modules", linear_only=True)
    quantize_base_nf4(model, keep_full=settings.modules_to_save, double_quant=settings.double_quant)
    return _inject(model, settings)


def apply_adapters(model: Transformer, cfg: LoRASection | Mapping[str, Any]) -> Transformer:
    """The engine's entry point: LoRA or QLoRA by `cfg.quantize`."""
    return apply_lora(model, cfg)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer should see (the adapters, once applied)."""
    return [p for p in model.parameters() if p.requires_grad]


def _logical_numel(p: torch.Tensor) -> int:
    """Elements a parameter stands for: a packed 4-bit weight holds two per byte."""
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, unique (a tied head once), 4-bit weights counted unpacked."""
    unique = {id(p): p for p in model.parameters()}.values()
    return (sum(_logical_numel(p) for p in unique if p.requires_grad),
            sum(_logical_numel(p) for p in unique))


def adapter_summary(model: nn.Module) -> str:
    trainable, total = parameter_counts(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def _full(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # FSDP2 shard → whole tensor (a collective)
        t = t.full_tensor()
    return t.detach().to("cpu")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors with PEFT's in-file names relative to the model (`layers.0.self_attn.
    q_proj.lora_A.weight`, `score.weight` for a module trained in full), on the CPU."""
    from peft import get_peft_model_state_dict

    if not has_adapters(model):
        raise AdapterError("the model has no adapters (apply_lora / load_adapter first)")
    # save_embedding_layers=False: no embedding is ever adapted here, and "auto" goes looking for
    # the base's config.json to check the vocabulary.
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    return {k: _full(v) for k, v in state.items()}


def _to_peft_key(name: str) -> str:
    head = name.split(".", 1)[0]
    return PEFT_PREFIX + (name if head in _HF_HEADS else "model." + name)


def _from_peft_key(key: str) -> str:
    if not key.startswith(PEFT_PREFIX):
        raise AdapterError(f"adapter key {key!r} does not start with {PEFT_PREFIX!r}: not a PEFT adapter file")
    name = key[len(PEFT_PREFIX):]
    return name[len("model."):] if name.startswith("model.") else name


def _write_adapter(tensors: Mapping[str, torch.Tensor], peft_config: Any, out_dir: str | os.PathLike[str],
                   base_model_name_or_path: str | None, task_type: str) -> Path:
    from safetensors.torch import save_file

    if not tensors:
        raise AdapterError("no adapter tensors to save (was LoRA applied?)")
    file_tensors = {_to_peft_key(k): v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    config_dict = peft_config.to_dict()
    for key, value in config_dict.items():  # sets are not JSON; PEFT writes them as lists too
        if isinstance(value, set):
            config_dict[key] = sorted(value)
    config_dict.update(base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                       inference_mode=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(file_tensors, p, metadata={"format": "pt"}))
    text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"
    atomic_write_text(out / ADAPTER_CONFIG, text)
    return out


def save_adapter(model: nn.Module, out_dir: str | os.PathLike[str], base_model_name_or_path: str | None,
                 task_type: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` as PEFT does for a HF Llama model.

    `base_model_name_or_path` is recorded for `PeftModel`/`AutoPeftModel` users (the HF export of the
    base, or the checkpoint it came from); `task_type` is `CAUSAL_LM`, or `SEQ_CLS` for a reward model
    (the default when the model has a `score` head). Under FSDP2 call it on every rank (the shards are
    gathered); files are written atomically.
    """
    if task_type is None:
        task_type = "SEQ_CLS" if isinstance(getattr(model, "score", None), nn.Module) else "CAUSAL_LM"
    return _write_adapter(adapter_state_dict(model), model.peft_config[ADAPTER_NAME], out_dir,
                          base_model_name_or_path, task_type)


def _adapter_name_from_module_key(name: str) -> str | None:
    """A module state-dict key → its name in an adapter file (as `get_peft_model_state_dict` names
    it), or None for a base weight: `....q_proj.lora_A.default.weight` → `....q_proj.lora_A.weight`,
    `score.modules_to_save.default.weight` → `score.weight`."""
    for part in (".lora_A.", ".lora_B."):
        marker = f"{part}{ADAPTER_NAME}."
        if marker in name:
            return name.replace(marker, part)
    marker = f".modules_to_save.{ADAPTER_NAME}."
    if marker in name:
        return name.replace(marker, ".")
    return None


def export_adapters(state: Mapping[str, torch.Tensor], mcfg: Any, cfg: LoRASection | Mapping[str, Any],
                    out_dir: str | os.PathLike[str], *, base_model_name_or_path: str | None = None,
                    task_type: str | None = None) -> str:
    """The engine's export of a LoRA / QLoRA run: the adapter in PEFT's format at `out_dir`.

    `state` is the trained module's full state dict (clean names, CPU, rank 0), `cfg` the run's
    `lora:` section; `mcfg` (the base's ModelConfig) is accepted for symmetry with the other exports.
    `task_type` defaults to `SEQ_CLS` when a `score` head was trained, else `CAUSAL_LM`. Merge a causal
    LM's adapter into a HF model with `refinery merge BASE out_dir -o OUT`.
    """
    del mcfg  # the adapter file does not record the base's shapes; PEFT checks them when loading
    settings = _settings(cfg)
    tensors = {}
    trained_in_full: list[str] = []
    for name, tensor in state.items():
        adapter_name = _adapter_name_from_module_key(name)
        if adapter_name is not None:
            tensors[adapter_name] = tensor
        marker = f".modules_to_save.{ADAPTER_NAME}."
        if marker in name:
            trained_in_full.append(name.split(marker)[0].rsplit(".", 1)[-1])
    # The modules PEFT trained in full, whether named in the config or added (a `score` head).
    settings = dataclasses.replace(settings, modules_to_save=sorted(set(trained_in_full)))
    if task_type is None:
        task_type = "SEQ_CLS" if "score" in trained_in_full else "CAUSAL_LM"
    return str(_write_adapter(tensors, settings.to_peft(), out_dir, base_model_name_or_path, task_type))


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"{path} not found: an adapter directory holds {ADAPTER_CONFIG} and "
                               f"{ADAPTER_WEIGHTS}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise AdapterError(f"{config_path}: peft_type {found!r} is not supported (LORA only)")
    return config


def load_adapter(model: Transformer, adapter_dir: str | os.PathLike[str], *, quantize: bool = False,
                 trainable: bool = False) -> Transformer:
    """Inject the adapter stored in `adapter_dir` into `model` (in place) and load its weights.

    Any PEFT LoRA adapter of a Llama model loads, ours or one trained with PEFT on HF's
    LlamaForCausalLM (its config is passed to PEFT as is). Keys must match exactly: a missing or
    unknown tensor is an error. `quantize` stores the base in NF4 first (QLoRA); `trainable` leaves
    the adapter trainable (to continue training it), else everything is frozen.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    root = Path(adapter_dir)
    from safetensors.torch import load_file

    config_dict = _read_adapter_config(root)
    file_tensors = load_file(root / ADAPTER_WEIGHTS)
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    peft_config = LoraConfig(**{k: v for k, v in config_dict.items() if k in known})
    peft_config.inference_mode = False
    tensors = {_from_peft_key(k): v for k, v in file_tensors.items()}

    _check_unwrapped(model)
    if quantize:
        quantize_base_nf4(model, keep_full=list(peft_config.modules_to_save or []))
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER_NAME)
    expected = set(adapter_state_dict(model))
    missing, unknown = expected - set(tensors), set(tensors) - expected
    if missing or unknown:
        raise AdapterError(f"{root}: adapter does not fit the model: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unknown)[:3]}")
    device = next(model.parameters()).device
    set_peft_model_state_dict(model, {k: v.to(device) for k, v in tensors.items()}, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable and ("lora_" in name or "modules_to_save" in name))
    return model


def _lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            yield name, module


def _dequantized_weight(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes 4-bit
        bnb = _import_bnb()
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    return weight.detach()


@torch.no_grad()
def merge_adapter(model: Transformer) -> Transformer:
    """Fold the adapters into the base weights, W + (alpha/r)·B·A, and remove them; in place.

    Returns a plain Transformer with the original parameter names (what `export_hf` writes). A 4-bit
    base is dequantized first, so a QLoRA model merges into full precision (with NF4's rounding).
    """
    from peft.utils import ModulesToSaveWrapper

    if not has_adapters(model):
        raise AdapterError("the model has no adapters to merge")
    for name, module in _lora_modules(model):
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear):  # Linear4bit is an nn.Linear too
            raise AdapterError(f"cannot merge the adapter of {name}: a {type(base).__name__}")
        weight = _dequantized_weight(base)
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        merged.weight.copy_(weight + module.get_delta_weight(ADAPTER_NAME).to(weight.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        _set_submodule(model, name, merged)
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            _set_submodule(model, name, module.modules_to_save[ADAPTER_NAME])
    del model.peft_config
    if hasattr(model, "is_loaded_in_4bit"):
        del model.is_loaded_in_4bit
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def load_base_model(path: str | os.PathLike[str]) -> Transformer:
    """A base model from a training checkpoint (run, `checkpoints` or step dir) or a HF Llama dir."""
    from training.checkpoint import load_transformer
    from training.export import import_hf

    p = Path(path)
    if (p / "config.json").is_file() and any((p / f).is_file() for f in
                                              ("model.safetensors", "model.safetensors.index.json")):
        return import_hf(p)
    return load_transformer(p)  # raises CheckpointError naming what is missing


def merge_to_hf(base: str | os.PathLike[str], adapter_dir: str | os.PathLike[str],
                out_dir: str | os.PathLike[str], *, tokenizer_path: str | os.PathLike[str] | None = None,
                force: bool = False) -> Path:
    """`refinery merge`: base (checkpoint or HF dir) + adapter → a merged HF Llama export.

    The tokenizer is `tokenizer_path`, else a `tokenizer.json` beside the base or the adapter; the
    special-token ids of a HF base's config.json are carried over.
    """
    from training.export import export_hf

    base_dir, adapter_root = Path(base), Path(adapter_dir)
    task_type = _read_adapter_config(adapter_root).get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{adapter_root} is a {task_type} adapter; merge writes causal LMs (CAUSAL_LM) only")
    model = load_base_model(base_dir)
    load_adapter(model, adapter_root)
    merge_adapter(model)
    ids: dict[str, Any] = {}
    if (base_dir / "config.json").is_file():
        hf = json.loads((base_dir / "config.json").read_text())
        ids = {f"{k}_id": hf.get(f"{k}_token_id") for k in ("bos", "eos", "pad")}
    tokenizer = tokenizer_path or next(
        (d / "tokenizer.json" for d in (base_dir, adapter_root) if (d / "tokenizer.json").is_file()), None)
    return export_hf(model, out_dir, tokenizer_path=tokenizer, force=force, **ids)
