"""Hugging Face Llama export and import: safetensors + config.json that `LlamaForCausalLM` loads.

Our parameter names are HF's minus the `model.` prefix and our rotary convention is HF's (rotate
halves), so the mapping is a rename, never a permutation. Export writes `rope_theta`/`rope_scaling`
(transformers 4.x) and the equivalent `rope_parameters` (transformers 5.x) so both versions load it.

An export is built whole in a temporary directory beside `out_dir` and renamed into place, so the
directory never mixes files of two exports (a stale `tokenizer.json` beside another model's weights)
and a failed export leaves nothing half-written. Its files are 0644, its directory 0755.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.model import ModelConfig, Transformer

HF_PREFIX = "model."
# Wrappers that prefix parameter names in a training state dict: torch.compile, DDP, checkpoint_wrapper.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_checkpoint_wrapped_module.")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Everything an export writes: a directory holding only these is an earlier export.
EXPORT_FILES = ("model.safetensors", "config.json", "tokenizer.json")
SUPPORTED_ARCHITECTURE = "LlamaForCausalLM"


class ExportError(ValueError):
    """An export or import that cannot be done as asked (target in the way, foreign model, ...)."""


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else HF_PREFIX + name


def hf_config(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """The `config.json` of a LlamaForCausalLM with our model's shapes."""
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope_parameters = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "dtype": _DTYPE_NAMES[dtype],
    }


def _full_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor shard → the whole parameter
            tensor = tensor.full_tensor()
        out[_clean_name(name)] = tensor
    return out


def tokenizer_vocab_size(path: str | os.PathLike[str]) -> int:
    """One past the largest token id of a `tokenizer.json` (added tokens included)."""
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as e:  # not JSON, or not a tokenizer
        raise ExportError(f"{path} is not a readable tokenizer.json: {str(e).splitlines()[0] if str(e) else e}") from e
    return max(vocab.values(), default=-1) + 1


def check_tokenizer_fits(path: str | os.PathLike[str], vocab_size: int) -> None:
    """Refuse a tokenizer that can emit ids the model has no embedding for: it belongs to another model."""
    n = tokenizer_vocab_size(path)
    if n > vocab_size:
        raise ExportError(f"{path} has token ids up to {n - 1} but the model's vocab_size is {vocab_size}: it is "
                          f"another model's tokenizer; pass the tokenizer the model was trained with")


def _check_target(out: Path, force: bool, allow_earlier_export: bool) -> None:
    """Refuse an `out` that is a file, or a non-empty directory unless `force` (or, with
    `allow_earlier_export`, unless it holds nothing but an earlier export's files)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; give a directory path for the export")
    if force or not out.is_dir():
        return
    entries = sorted(out.iterdir())
    earlier_export = all(e.name in EXPORT_FILES and e.is_file() for e in entries)
    if entries and not (allow_earlier_export and earlier_export):
        names = ", ".join(e.name for e in entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ExportError(f"{out} is not empty ({names}); export into a new directory, or pass --force "
                          f"(force=True) to replace it whole")


def _publish_dir(out: Path, fill: Callable[[Path], None], needed_bytes: int) -> None:
    """Build the directory with `fill` in a temporary sibling, then swap it in for `out` (replacing it)."""
    from training.checkpoint import write_error

    out = Path(os.path.abspath(out))  # "." or "a/.." have no name to build a sibling from
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as e:
        raise write_error(parent, e) from e
    try:
        try:
            fill(tmp)
        except (OSError, RuntimeError, SafetensorError) as e:  # a full disk, most often: say so
            raise write_error(parent, e, needed_bytes) from e
        for f in tmp.iterdir():
            f.chmod(0o644)  # mkdtemp makes 0700 and tempfiles 0600: an export is for others to read
        tmp.chmod(0o755)
        if out.is_dir():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / out.name, out)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_hf(
    model: Transformer | Mapping[str, Any] | tuple[Mapping[str, Any], ModelConfig],
    out_dir: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str] | None = None,
    *,
    config: ModelConfig | None = None,
    dtype: torch.dtype | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    force: bool = False,
) -> Path:
    """Write `model.safetensors`, `config.json` (and `tokenizer.json` if given) as the directory `out_dir`.

    `out_dir` may be new, empty or an earlier export (replaced whole, as the trainer does with its
    `hf/` on every finished run); anything else is refused unless `force`, which replaces it whole.

    `model` is a Transformer, a `(state_dict, ModelConfig)` pair, or a state dict with `config=`;
    wrapper prefixes (`_orig_mod.`, `module.`, `_checkpoint_wrapped_module.`) are stripped. FSDP2
    DTensors are gathered with `full_tensor()`, a collective: under FSDP2 either call this on every
    rank with a distinct or shared `out_dir`, or (better) pass rank 0's full state dict from
    `torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True, cpu_offload=True)`.
    A tied head is stored once (as HF does); `dtype` casts floating weights (default: as stored).
    """
    while isinstance(model, torch.nn.Module) and not isinstance(model, Transformer):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)  # compile / DDP
        if inner is None:
            raise TypeError(f"export_hf cannot export a {type(model).__name__}; pass our Transformer")
        model = inner
    if isinstance(model, Transformer):
        cfg, state = model.cfg, _full_state_dict(model.state_dict())
    else:
        if isinstance(model, tuple):
            model, config = model
        if config is None:
            raise ValueError("export_hf of a state dict needs its ModelConfig (config=...)")
        cfg, state = config, _full_state_dict(model)
    expected = set(param_names(cfg))
    missing, unknown = expected - set(state), set(state) - expected
    if missing or unknown:
        raise ValueError(f"state dict does not match the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unknown)[:5]}")
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    store_dtype = dtype or state["embed_tokens.weight"].dtype
    tensors = {
        _to_hf_name(name): t.detach().to("cpu", store_dtype if t.is_floating_point() else t.dtype).contiguous()
        for name, t in state.items()
    }

    out = Path(out_dir)
    _check_target(out, force, allow_earlier_export=True)
    src = Path(tokenizer_path) if tokenizer_path is not None else None
    if src is not None:
        if not src.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {src}")
        check_tokenizer_fits(src, cfg.vocab_size)
    config_json = json.dumps(hf_config(cfg, store_dtype, bos_id, eos_id, pad_id), indent=2) + "\n"

    def fill(d: Path) -> None:
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(config_json)
        if src is not None:
            shutil.copyfile(src, d / "tokenizer.json")

    _publish_dir(out, fill, needed_bytes=sum(t.numel() * t.element_size() for t in tensors.values()))
    return out


def param_names(cfg: ModelConfig) -> list[str]:
    """State-dict keys (parameters only) of a Transformer with this config, without building it."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return [name for name, _ in model.named_parameters(remove_duplicate=False)]


def _config_from_hf(hf: Mapping[str, Any], source: Path | str = "config.json") -> ModelConfig:
    if not isinstance(hf, Mapping):
        raise ExportError(f"{source} is not a JSON object")
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    is_llama = model_type in (None, "llama") and (SUPPORTED_ARCHITECTURE in archs if archs else model_type == "llama")
    if not is_llama:
        found = ", ".join(map(str, archs)) if archs else "no architecture"
        raise ExportError(f"{source}: not a Llama checkpoint: it names {found} (model_type={model_type!r}); "
                          f"only {SUPPORTED_ARCHITECTURE} is supported")
    required = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ExportError(f"{source} lacks {missing}, which a {SUPPORTED_ARCHITECTURE} config.json has")
    dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        raise ValueError(f"head_dim {head_dim} × heads {n_heads} != hidden_size {dim}: not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("Llama checkpoints with attention/MLP biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")

    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling")
    if legacy:
        params = {**params, **legacy}
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    scaling = None if rope_type == "default" else {"rope_type": rope_type, **params}
    if scaling is not None and scaling.get("rope_type") == "llama3":
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    if scaling is not None and rope_type in ("linear", "llama3"):
        # Keep only the keys our config takes (HF adds e.g. attention_factor); ModelConfig validates.
        keep = {"rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
        scaling = {k: v for k, v in scaling.items() if k in keep}
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        ffn_hidden=int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            path = hf_dir / shard
            if not path.is_file():
                raise FileNotFoundError(f"shard {shard} listed in {index} is missing")
            tensors.update(load_file(path))
        return tensors
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {hf_dir}")


def import_hf(hf_dir: str | os.PathLike[str], dtype: torch.dtype | None = torch.float32) -> Transformer:
    """Load a Hugging Face Llama checkpoint (single or sharded safetensors) as our Transformer."""
    root = Path(hf_dir)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {root}")
    try:
        hf_cfg = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{config_path} is not valid JSON: {e}") from e
    cfg = _config_from_hf(hf_cfg, config_path)
    hf_tensors = _read_hf_tensors(root)

    state: dict[str, torch.Tensor] = {}
    for name, tensor in hf_tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # old checkpoints stored the (derived) rope buffer
            continue
        ours = name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name
        state[ours] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state.get("embed_tokens.weight", state.get("lm_head.weight"))
    expected = set(param_names(cfg))
    missing, unknown = expected - set(state), set(state) - expected
    if missing or unknown:
        raise ValueError(f"{root}: checkpoint does not match its config.json: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unknown)[:5]}")

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    # assign: the parameters take the tensors' dtype (`dtype`, or as stored when None); copying into
    # the float32 parameters of a fresh model would silently ignore `dtype`.
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # to_empty and assign each untie a shared head
    model.reset_rope_tables()
    return model


def export_checkpoint(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                      tokenizer_path: str | os.PathLike[str] | None = None, force: bool = False) -> Path:
    """`refinery export`: a training checkpoint (run, `checkpoints` or step dir) → HF Llama dir.

    A non-empty `out_dir`, even an earlier export, is refused unless `force`: the user named it, and
    what is in it may be another model's (replaced whole, never merged)."""
    from training.checkpoint import load_model_file

    _check_target(Path(out_dir), force, allow_earlier_export=False)  # before the slow load
    data = load_model_file(checkpoint)
    return export_hf((data["model"], ModelConfig.from_dict(data["model_config"])), out_dir,
                     tokenizer_path=tokenizer_path, force=True)


def import_to_checkpoint(hf_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """`refinery import`: a HF Llama dir → a weights-only checkpoint that `train.init_from` accepts."""
    from training.checkpoint import write_model_checkpoint

    model = import_hf(hf_dir)
    out = write_model_checkpoint(out_dir, model.state_dict(), model.cfg.to_dict())
    tok = Path(hf_dir) / "tokenizer.json"
    if tok.is_file():
        shutil.copyfile(tok, Path(out) / "tokenizer.json")
    return out
