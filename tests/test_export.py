"""HF export/import: transformers' LlamaForCausalLM loads our export with the same logits, and back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.export import ExportError, export_hf, import_hf
from training.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
# Exact parity: our layers run transformers' Llama ops in the same order (docs/decisions.md, "Model"), so
# float32 logits are equal bit for bit (measured: max |difference| 0.0 on every case here, seeds 0-4).


def tiny(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(vocab_size=101, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden=96,
                                   max_seq_len=128, norm_eps=1e-5)
    base.update(overrides)
    return ModelConfig.from_dict(base)


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # tied, GQA (6 query heads over 2 kv heads), default rope
        {"tie_embeddings": False, "n_kv_heads": 6},  # untied, plain multi-head
        {"tie_embeddings": False, "rope_scaling": LLAMA3_SCALING, "rope_theta": 500000.0},
        {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    ],
    ids=["tied-gqa", "untied-mha", "untied-llama3-scaling", "tied-linear-scaling"],
)
def test_transformers_loads_export_with_the_same_logits(tmp_path: Path, overrides: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = Transformer(tiny(**overrides)).eval()
    ids = torch.randint(0, 101, (2, 100))  # past original_max_position_embeddings: scaling matters
    export_hf(model, tmp_path)
    with torch.no_grad():
        ours = model(ids)
    theirs = hf_logits(tmp_path, ids)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max().item()


def test_import_round_trip_restores_weights_config_and_logits(tmp_path: Path) -> None:
    cfg = tiny(tie_embeddings=False, rope_scaling=LLAMA3_SCALING)
    model = Transformer(cfg).eval()
    export_hf(model, tmp_path)
    back = import_hf(tmp_path).eval()
    assert back.cfg == cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    ids = torch.randint(0, 101, (1, 40))
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))


def test_tied_export_stores_the_embedding_once_and_import_reties(tmp_path: Path) -> None:
    export_hf(Transformer(tiny()), tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    back = import_hf(tmp_path)
    assert back.lm_head.weight is back.embed_tokens.weight


def test_import_reads_a_sharded_checkpoint_saved_by_transformers(tmp_path: Path) -> None:
    torch.manual_seed(1)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = import_hf(tmp_path).eval()
    assert ours.cfg.rope_theta == 20000.0 and ours.cfg.n_kv_heads == 3 and ours.cfg.norm_eps == 1e-6
    ids = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert torch.equal(a, b), (a - b).abs().max().item()


def word_tokenizer(path: Path, n_tokens: int) -> Path:
    """A word-level tokenizer.json with ids 0..n_tokens-1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, n_tokens)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_export_writes_config_ids_dtype_and_tokenizer(tmp_path: Path) -> None:
    tokenizer = word_tokenizer(tmp_path / "tok.json", 101)
    out = export_hf(Transformer(tiny()), tmp_path / "hf", tokenizer_path=tokenizer, dtype=torch.bfloat16,
                    bos_id=1, eos_id=2, pad_id=0)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert config["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_text() == tokenizer.read_text()
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tok.json"]  # no temporaries left


def test_export_accepts_a_wrapped_training_state_dict(tmp_path: Path) -> None:
    model = Transformer(tiny(tie_embeddings=False))
    wrapped = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    export_hf(wrapped, tmp_path, config=model.cfg)
    back = import_hf(tmp_path)
    assert torch.equal(back.layers[1].mlp.down_proj.weight, model.layers[1].mlp.down_proj.weight)


def test_export_unwraps_a_compiled_model(tmp_path: Path) -> None:
    model = Transformer(tiny())
    export_hf(torch.compile(model), tmp_path)  # wrapping only: nothing is compiled until called
    assert torch.equal(import_hf(tmp_path).norm.weight, model.norm.weight)


def test_bad_inputs_get_clear_errors(tmp_path: Path) -> None:
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="needs its ModelConfig"):
        export_hf(model.state_dict(), tmp_path)
    with pytest.raises(ValueError, match="does not match the config"):
        export_hf(model.state_dict(), tmp_path, config=tiny(n_layers=3))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        export_hf(model, tmp_path, tokenizer_path=tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(tmp_path / "nowhere")
    export_hf(model, tmp_path / "gpt2ish")
    config_path = tmp_path / "gpt2ish" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not a Llama checkpoint"):
        import_hf(tmp_path / "gpt2ish")


@pytest.mark.parametrize("dtype", [torch.bfloat16, None], ids=["cast", "as-stored"])
def test_import_builds_the_model_in_the_requested_or_stored_dtype(tmp_path: Path, dtype: torch.dtype | None) -> None:
    model = Transformer(tiny(tie_embeddings=False))
    export_hf(model, tmp_path, dtype=torch.bfloat16 if dtype is None else torch.float32)
    back = import_hf(tmp_path, dtype=dtype)
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert torch.equal(back.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert back.rope_cos.dtype == torch.float32  # rotary tables stay float32, cast per use
    tied = import_hf(export_hf(Transformer(tiny()), tmp_path / "tied"), dtype=dtype)
    assert tied.lm_head.weight is tied.embed_tokens.weight


# ------------------------------------------------------------------ a clean, complete export or none


def test_export_refuses_a_directory_with_other_files_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"out is not empty \(notes.txt\).*--force"):
        export_hf(Transformer(tiny()), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    export_hf(Transformer(tiny()), out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # replaced whole


def test_reexport_over_an_earlier_export_leaves_no_stale_tokenizer(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    export_hf(Transformer(tiny()), out, tokenizer_path=word_tokenizer(tmp_path / "tok.json", 101))
    export_hf(Transformer(tiny(vocab_size=300)), out)  # as the trainer does with its hf/ on a rerun
    assert not (out / "tokenizer.json").exists()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300


def test_export_command_refuses_a_non_empty_directory_or_a_file_without_force(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipelines.cli import main
    from training.checkpoint import write_model_checkpoint

    small, large = Transformer(tiny()), Transformer(tiny(vocab_size=300))
    ckpt_small = write_model_checkpoint(tmp_path / "small", small.state_dict(), small.cfg.to_dict())
    ckpt_large = write_model_checkpoint(tmp_path / "large", large.state_dict(), large.cfg.to_dict())
    out = tmp_path / "hf"
    tok = word_tokenizer(tmp_path / "tok.json", 101)
    assert main(["-q", "export", str(ckpt_small), "-o", str(out), "--tokenizer", str(tok)]) == 0
    capsys.readouterr()
    assert main(["-q", "export", str(ckpt_large), "-o", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 101  # untouched
    assert main(["-q", "export", str(ckpt_large), "-o", str(out), "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 300
    assert not (out / "tokenizer.json").exists()  # the small model's tokenizer went with it
    (tmp_path / "file").write_text("")
    capsys.readouterr()
    assert main(["-q", "export", str(ckpt_small), "-o", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_exported_files_are_readable_by_others(tmp_path: Path) -> None:
    out = export_hf(Transformer(tiny()), tmp_path / "hf", tokenizer_path=word_tokenizer(tmp_path / "t.json", 101))
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "model.safetensors": 0o644, "config.json": 0o644, "tokenizer.json": 0o644}
    assert out.stat().st_mode & 0o777 == 0o755


def test_export_refuses_a_tokenizer_with_ids_beyond_the_vocabulary(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"token ids up to 199 but the model's vocab_size is 101"):
        export_hf(Transformer(tiny()), tmp_path / "hf", tokenizer_path=word_tokenizer(tmp_path / "t.json", 200))
    assert not (tmp_path / "hf").exists()


def test_a_full_disk_during_export_says_so_and_keeps_the_earlier_export(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import SafetensorError

    from training import export
    from training.checkpoint import CheckpointError

    out = export_hf(Transformer(tiny()), tmp_path / "hf")
    before = (out / "model.safetensors").read_bytes()

    def full(tensors: object, path: str, metadata: object = None) -> None:
        Path(path).write_bytes(b"partial")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(export, "save_file", full)
    with pytest.raises(CheckpointError, match=rf"disk full: cannot write into {tmp_path}\b"):
        export_hf(Transformer(tiny()), out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # the partial export is gone


@pytest.mark.parametrize(("config", "message"), [
    ({"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 8},
     r"names BertForMaskedLM \(model_type='bert'\); only LlamaForCausalLM is supported"),
    ({"_class_name": "UNet2DConditionModel", "in_channels": 4},  # no architecture at all: was a KeyError
     r"names no architecture \(model_type=None\); only LlamaForCausalLM is supported"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 8},
     r"lacks \['hidden_size', 'num_attention_heads'"),
])
def test_import_of_another_architecture_says_which_it_found(tmp_path: Path, config: dict[str, object],
                                                            message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match=message):
        import_hf(tmp_path)
