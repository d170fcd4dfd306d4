"""LoRA / QLoRA (training/adapters.py): only adapters train, PEFT-format adapters load onto the exported
LlamaForCausalLM with our logits, `refinery merge` equals base + adapter, QLoRA's base really is 4-bit,
and a checkpoint of an adapted model resumes exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from training.adapters import (
    DEFAULT_TARGETS,
    AdapterError,
    LoRASection,
    adapter_state_dict,
    apply_adapters,
    apply_lora,
    apply_qlora,
    export_adapters,
    load_adapter,
    merge_adapter,
    merge_to_hf,
    parameter_counts,
    save_adapter,
    trainable_parameters,
)
from training.checkpoint import load_model_file, write_model_checkpoint
from training.config import load_config
from training.engine import train
from training.export import export_hf, hf_config, import_hf
from training.metrics import read_metrics
from training.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PARITY_ATOL = 1e-4  # float32 logits, as for the plain export (tests/test_export.py)
VOCAB = 97


def tiny(**overrides: object) -> ModelConfig:
    # dims multiples of 64: bitsandbytes' NF4 blocks are 64 wide
    base: dict[str, object] = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   ffn_hidden=128, max_seq_len=64)
    base.update(overrides)
    return ModelConfig.from_dict(base)


def make_model(seed: int = 0, **overrides: object) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**overrides))


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """LoRA's B starts at zero (the adapter is a no-op): give it values so that parity tests mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def ids(batch: int = 2, length: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1]).float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 5) -> list[float]:
    losses = []
    for step in range(steps):
        loss = lm_loss(model, ids(seed=seed + step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_starts_at_the_base_model_and_trains_only_adapter_weights() -> None:
    model = make_model()
    base_logits = model(ids()).detach()
    apply_lora(model, LoRASection(r=4, alpha=8, dropout=0.0))
    assert torch.equal(model(ids()), base_logits)  # B = 0: the adapter starts as a no-op
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # AdamW with weight decay over *every* parameter: frozen ones must still not move (no grad, no step).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_steps(model, opt, 3)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapter_keys = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert changed == adapter_keys
    # Every targeted matrix got its own pair: 7 per block.
    assert len(adapter_keys) == 2 * len(DEFAULT_TARGETS) * model.cfg.n_layers


def test_trainable_parameter_count_is_r_times_in_plus_out_per_target() -> None:
    model = make_model()
    total_before = model.num_params()
    apply_lora(model, {"r": 8, "target_modules": ["q_proj", "v_proj"]})
    cfg = model.cfg
    q = 8 * (cfg.dim + cfg.n_heads * cfg.head_dim)
    v = 8 * (cfg.dim + cfg.n_kv_heads * cfg.head_dim)
    trainable, total = parameter_counts(model)
    assert trainable == cfg.n_layers * (q + v) == sum(p.numel() for p in trainable_parameters(model))
    assert total == total_before + trainable
    lora_modules = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora_modules == {"q_proj", "v_proj"}


def test_bad_lora_settings_are_one_line_errors() -> None:
    with pytest.raises(AdapterError, match="no module named 'qproj'.*q_proj"):
        apply_lora(make_model(), {"target_modules": ["qproj"]})
    with pytest.raises(AdapterError, match="Embedding"):
        apply_lora(make_model(), {"target_modules": ["embed_tokens"]})
    with pytest.raises(AdapterError, match="unknown lora settings"):
        LoRASection.from_dict({"rank": 8})
    with pytest.raises(AdapterError, match="lora.r"):
        LoRASection(r=0)
    section = LoRASection()
    section.dropout = 1.5  # as a command-line override sets it: checked when applied
    with pytest.raises(AdapterError, match="lora.dropout"):
        apply_adapters(make_model(), section)
    model = apply_lora(make_model(), {})
    with pytest.raises(AdapterError, match="already has adapters"):
        apply_lora(model, {})
    # A comma-separated override string is a list of names.
    assert LoRASection(target_modules="q_proj, v_proj").target_modules == ["q_proj", "v_proj"]


def base_export(model: Transformer, out: Path) -> Path:
    """Export the base weights of an adapted model (what it was built from) as HF Llama."""
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    return export_hf((state, model.cfg), out)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_peft_loads_our_adapter_onto_the_exported_llama_with_our_logits(tmp_path: Path, tie: bool) -> None:
    model = make_model(tie_embeddings=tie)
    apply_lora(model, LoRASection(r=4, alpha=16, dropout=0.1))
    randomize_adapters(model)
    model.eval()
    x = ids(length=40)
    with torch.no_grad():
        ours = model(x)
    hf_dir = base_export(model, tmp_path / "hf")
    adapter_dir = save_adapter(model, tmp_path / "adapter", str(hf_dir))

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 16 and sorted(config["target_modules"]) == sorted(
        DEFAULT_TARGETS)
    keys = load_file(adapter_dir / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys

    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa")
    peft_model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        theirs = peft_model(x).logits
    assert (ours - theirs).abs().max().item() <= PARITY_ATOL
    with torch.no_grad(), peft_model.disable_adapter():
        without = peft_model(x).logits
    assert (ours - without).abs().max().item() > 100 * PARITY_ATOL  # the adapter matters

    # And back: our loader puts the same adapter onto our import of the HF base.
    reloaded = load_adapter(import_hf(hf_dir), adapter_dir).eval()
    with torch.no_grad():
        assert (reloaded(x) - ours).abs().max().item() <= PARITY_ATOL
    assert not trainable_parameters(reloaded)


def test_refinery_merge_equals_base_plus_adapter(tmp_path: Path) -> None:
    from pipelines.cli import main

    model = make_model(tie_embeddings=False)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = write_model_checkpoint(tmp_path / "base_ckpt", base_state, model.cfg.to_dict())
    apply_lora(model, {"r": 4, "dropout": 0.0})
    randomize_adapters(model)
    adapter_dir = save_adapter(model, tmp_path / "adapter", str(ckpt))
    x = ids(length=32)
    with torch.no_grad():
        expected = model.eval()(x)

    assert main(["merge", str(ckpt), str(adapter_dir), "-o", str(tmp_path / "merged")]) == 0
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="sdpa")
    with torch.no_grad():
        assert (merged(x).logits - expected).abs().max().item() <= PARITY_ATOL
    # The merged export holds plain Llama weights, no adapter tensors.
    assert not [k for k in load_file(tmp_path / "merged" / "model.safetensors") if "lora" in k]

    # merge_adapter in memory gives a plain Transformer with the original names.
    merge_adapter(model)
    assert set(model.state_dict()) == set(base_state)
    assert main(["merge", str(ckpt), str(tmp_path / "nowhere"), "-o", str(tmp_path / "m2")]) == 2


def test_qlora_stores_the_base_in_nf4_and_trains_only_adapters() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    dim, ffn = 256, 512  # big enough that the fixed quant tables do not dominate the byte count
    reference = make_model(dim=dim, ffn_hidden=ffn)
    model = apply_qlora(copy.deepcopy(reference), LoRASection(r=4, dropout=0.0))

    fp32_bytes = quant_bytes = 0
    for name, module in reference.named_modules():
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        layer = model.get_submodule(name).base_layer
        assert isinstance(layer, bnb.nn.Linear4bit)
        weight = layer.weight
        assert weight.dtype == torch.uint8 and weight.numel() == module.weight.numel() // 2  # 2 per byte
        state = weight.quant_state
        assert state.quant_type == "nf4" and state.blocksize == 64 and state.nested  # double quantization
        assert tuple(state.shape) == tuple(module.weight.shape)
        fp32_bytes += module.weight.numel() * 4
        tensors = [weight.data, state.absmax, state.code, state.state2.absmax, state.state2.code]
        quant_bytes += sum(t.numel() * t.element_size() for t in tensors)
        # Real 4-bit rounding: close to the fp32 weight, never equal.
        restored = bnb.functional.dequantize_4bit(weight.data, state)
        error = (restored - module.weight).abs()
        assert error.max() > 0 and error.mean() < 0.1 * module.weight.abs().mean()
    ratio = quant_bytes / fp32_bytes
    assert 1 / 8 < ratio < 0.14, ratio  # 4 bits + 8-bit scales per 64 weights ≈ 0.129 of fp32

    # The 4-bit model computes what the fp32 one does, up to quantization error.
    x = ids()
    with torch.no_grad():
        ref, out = reference(x), model(x)
    assert 0 < (out - ref).norm() < 0.25 * ref.norm()

    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    train_steps(model, opt, 2)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in frozen.items())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_checkpoint_of_an_adapted_model_resumes_exactly(tmp_path: Path, quantize: str) -> None:
    """What the engine does: full model + optimizer state dicts, a rebuilt adapted model loads them."""
    if quantize == "nf4":
        pytest.importorskip("bitsandbytes")
    section = LoRASection(r=4, dropout=0.1, quantize=quantize)  # dropout: RNG must not matter here
    base = make_model()
    model = apply_adapters(copy.deepcopy(base), section)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    train_steps(model, opt, 2)
    torch.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                "rng": torch.get_rng_state()}, tmp_path / "ckpt.pt")
    uninterrupted = train_steps(model, opt, 2, seed=50)

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    torch.manual_seed(123)  # a different adapter init, overwritten by the checkpoint
    resumed = apply_adapters(copy.deepcopy(base), section)
    resumed_opt = torch.optim.AdamW(trainable_parameters(resumed), lr=1e-2, weight_decay=0.1)
    set_model_state_dict(resumed, saved["model"])
    set_optimizer_state_dict(resumed, resumed_opt, saved["optim"])
    torch.set_rng_state(saved["rng"])
    assert train_steps(resumed, resumed_opt, 2, seed=50) == uninterrupted


def test_export_adapters_from_a_state_dict_matches_save_adapter(tmp_path: Path) -> None:
    model = apply_lora(make_model(), {"r": 4, "target_modules": ["q_proj", "down_proj"]})
    randomize_adapters(model)
    section = LoRASection(r=4, target_modules=["q_proj", "down_proj"])
    exported = Path(export_adapters(model.state_dict(), model.cfg, section, tmp_path / "a",
                                    base_model_name_or_path="runs/base"))
    saved = save_adapter(model, tmp_path / "b", "runs/base")
    a, b = load_file(exported / "adapter_model.safetensors"), load_file(saved / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((exported / "adapter_config.json").read_text()) == json.loads(
        (saved / "adapter_config.json").read_text())
    assert len(a) == len(adapter_state_dict(model)) == 2 * 2 * model.cfg.n_layers


class ScoreModel(Transformer):
    """A reward-model-shaped Transformer: a scalar `score` head, as training/reward_model.py has."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.score = nn.Linear(cfg.dim, 1, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.score(self.hidden_states(input_ids)).squeeze(-1)


def test_a_score_head_trains_in_full_and_loads_onto_hf_sequence_classification(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ScoreModel(tiny(tie_embeddings=False))
    apply_lora(model, {"r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n} == {
        "score.modules_to_save.default.weight"}
    randomize_adapters(model)
    x = ids(length=16).clamp(min=1)  # 0 is the pad id below: HF scores the last non-pad token
    with torch.no_grad():
        ours = model.eval()(x)[:, -1]
    adapter_dir = save_adapter(model, tmp_path / "adapter", None)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    config = {**hf_config(model.cfg), "architectures": ["LlamaForSequenceClassification"], "num_labels": 1,
              "pad_token_id": 0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    state = {}
    for key, value in model.state_dict().items():
        if "lora_" in key or "modules_to_save" in key or key.startswith("lm_head"):
            continue
        key = key.replace(".base_layer", "").replace("score.original_module", "score")
        state[key if key.startswith("score") else "model." + key] = value.contiguous()
    save_file(state, hf_dir / "model.safetensors")
    hf = transformers.LlamaForSequenceClassification.from_pretrained(hf_dir, attn_implementation="sdpa")
    peft_model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    with torch.no_grad():
        theirs = peft_model(x).logits.squeeze(-1)
    assert (ours - theirs).abs().max().item() <= PARITY_ATOL

    with pytest.raises(AdapterError, match="SEQ_CLS"):
        merge_to_hf(hf_dir, adapter_dir, tmp_path / "merged")


# ------------------------------------------------------------------------------------ on the engine


def write_chat_shards(root: Path, n: int, seed: int) -> Path:
    """Chat shards by the contract of training/chat.py, by hand: [bos] <user> prompt <end> <assistant>
    answer <end>, the mask on the answer and its <end>."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n):
        prompt, answer = rng.integers(8, VOCAB, rng.integers(2, 8)), rng.integers(8, VOCAB, rng.integers(2, 8))
        seqs.append(([1, 2, *prompt, 4, 3, *answer, 4], [0] * (len(prompt) + 4) + [1] * (len(answer) + 1)))
    root.mkdir(parents=True)
    np.save(root / "a.tokens.npy", np.concatenate([np.array(ids, np.uint16) for ids, _ in seqs]))
    np.save(root / "a.mask.npy", np.concatenate([np.array(mask, np.uint8) for _, mask in seqs]))
    np.save(root / "a.idx.npy", np.cumsum([len(ids) for ids, _ in seqs]).astype(np.int64))
    manifest = {"format": "refinery.chat/1", "kind": "chat", "vocab_size": VOCAB, "tokenizer": "tokenizer.json",
                "examples": n, "shards": [{"tokens": "a.tokens.npy", "mask": "a.mask.npy", "idx": "a.idx.npy",
                                           "sequences": n}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_sft_with_lora_on_the_engine_resumes_exactly_and_exports_a_peft_adapter(tmp_path: Path,
                                                                                quantize: str) -> None:
    if quantize == "nf4":
        pytest.importorskip("bitsandbytes")
    base = make_model(seed=3)
    init = write_model_checkpoint(tmp_path / "init", base.state_dict(), base.cfg.to_dict())
    train_dir, heldout = write_chat_shards(tmp_path / "chat", 64, 0), write_chat_shards(tmp_path / "held", 8, 1)

    def run(out: Path, *extra: str) -> dict[str, object]:
        overrides = [f"data.mix={train_dir}", f"data.eval={heldout}", "data.seq_len=48", f"train.init_from={init}",
                     f"train.out_dir={out}", "train.batch_size=4", "optim.lr=1e-2", "optim.warmup=1",
                     "train.steps=6", "train.log_every=1", "train.eval_every=3", "train.eval_batches=2",
                     "train.checkpoint_every=2", "train.progress=false", "lora.r=4", "lora.dropout=0.1",
                     "lora.target_modules=q_proj,v_proj,down_proj", f"lora.quantize={quantize}", *extra]
        return train(load_config(None, overrides, stage="sft"))

    run(tmp_path / "a")
    run(tmp_path / "b", "train.stop_after=3")
    assert run(tmp_path / "b")["start_step"] == 3
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b, strict=True):
        for key in {"loss", "grad_norm", "eval_loss"} & set(ra):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6, rel=0), (key, ra["step"])
    assert a[-1]["loss"] < a[0]["loss"]  # the adapter learns

    # The checkpoint holds the adapter and the untouched base (LoRA) or its 4-bit copy (QLoRA).
    saved = load_model_file(tmp_path / "a")["model"]
    lora_keys = [k for k in saved if ".lora_" in k]
    assert len(lora_keys) == 2 * 3 * base.cfg.n_layers
    if quantize == "none":
        for key, value in base.state_dict().items():
            stored = saved.get(key, saved.get(key.replace(".weight", ".base_layer.weight")))
            assert torch.equal(stored, value), key
    else:
        assert saved["layers.0.self_attn.q_proj.base_layer.weight"].dtype == torch.uint8

    # The exported adapter loads with PEFT onto the HF export of the base, as onto our import of it.
    adapter_dir = tmp_path / "a" / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(init) and config["r"] == 4
    hf_dir = export_hf(base, tmp_path / "base_hf")
    x = ids(length=20)
    peft_model = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa"), adapter_dir).eval()
    ours = load_adapter(import_hf(hf_dir), adapter_dir).eval()
    with torch.no_grad():
        assert (peft_model(x).logits - ours(x)).abs().max().item() <= PARITY_ATOL
