"""The Llama-style model: config, shapes, causality, tying, FLOP count, init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.flops import mfu, peak_flops
from training.model import ModelConfig, Transformer


def tiny(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                   max_seq_len=64)
    base.update(overrides)
    return ModelConfig.from_dict(base)


@pytest.mark.parametrize("vocab", [2048, 4096, 8192])
def test_named_1m_is_about_one_million_parameters_at_small_vocabularies(vocab: int) -> None:
    with torch.device("meta"):
        model = Transformer(ModelConfig.named("1m", vocab))
    assert 0.5e6 <= model.num_params() <= 1.5e6


@pytest.mark.parametrize(
    ("size", "vocab", "low", "high"),
    [("10m", 8192, 8e6, 12e6), ("125m", 50304, 100e6, 140e6), ("350m", 50304, 300e6, 380e6),
     ("1b", 32000, 0.95e9, 1.3e9)],
)
def test_named_sizes_match_their_names(size: str, vocab: int, low: float, high: float) -> None:
    with torch.device("meta"):
        model = Transformer(ModelConfig.named(size, vocab))
    assert low <= model.num_params() <= high


def test_unknown_size_and_unknown_config_keys_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown model size"):
        ModelConfig.named("7b", 1000)
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**tiny().to_dict(), "n_layer": 3})


def test_config_round_trips_through_dict() -> None:
    cfg = tiny(rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_embeddings=False)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"n_heads": 5}, "multiple of n_heads"), ({"n_kv_heads": 3}, "multiple of n_kv_heads"),
     ({"dim": 36, "n_heads": 12, "n_kv_heads": 4}, "even"), ({"vocab_size": 0}, "positive int"),
     ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
     ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing keys"),
     ({"rope_scaling": {"rope_type": "linear", "factor": 4.0, "rope_theta": 40000.0}}, "set rope_theta instead")],
)
def test_invalid_configs_are_rejected_with_a_reason(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_logits_have_batch_time_vocab_shape_and_equal_head_of_hidden_states() -> None:
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 97, (3, 11))
    logits = model(ids)
    assert logits.shape == (3, 11, 97)
    assert torch.equal(logits, model.lm_head(model.hidden_states(ids)))


def test_future_tokens_do_not_change_earlier_logits() -> None:
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 97, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])  # causal: bit for bit, not just close (measured)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_tied_head_shares_the_embedding_and_counts_once() -> None:
    tied, untied = Transformer(tiny()), Transformer(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_params() - tied.num_params() == 97 * 32
    assert tied.num_params(exclude_embeddings=True) == tied.num_params() - 97 * 32


def test_flops_per_token_is_six_n_plus_attention_term() -> None:
    cfg = tiny()
    model = Transformer(cfg)
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32  # q,o + k,v + SwiGLU + two norms
    n = cfg.n_layers * per_layer + 32 + 97 * 32  # final norm + the (tied) head matmul
    assert model.flops_per_token(50) == 6 * n + 12 * 2 * 4 * 8 * 50


def test_every_parameter_gets_a_gradient_from_the_lm_loss() -> None:
    model = Transformer(tiny(tie_embeddings=False))
    ids = torch.randint(0, 97, (2, 9))
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_sequences_longer_than_max_seq_len_are_an_error() -> None:
    model = Transformer(tiny(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros((1, 9), dtype=torch.long))


def test_init_is_seeded_and_works_after_meta_construction() -> None:
    a = Transformer(tiny())
    a.init_weights(seed=3)
    with torch.device("meta"):
        b = Transformer(tiny())
    b.to_empty(device="cpu")
    b.init_weights(seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert torch.equal(a.rope_cos, b.rope_cos)
    # Residual output projections start smaller (GPT-2 scaling), norms at one.
    assert a.layers[0].self_attn.o_proj.weight.std() < a.layers[0].self_attn.q_proj.weight.std()
    assert torch.all(a.norm.weight == 1)


def test_peak_flops_table_knows_hopper_and_returns_none_on_cpu() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cpu") is None
    assert peak_flops("Some Unknown Accelerator") is None
    assert mfu(1000.0, 1e9, 2e12) == pytest.approx(0.5)
    assert mfu(1000.0, 1e9, None) is None
