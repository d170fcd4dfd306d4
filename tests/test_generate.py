"""KV-cached sampling: greedy equals uncached argmax and HF's greedy generate; batching, padding, top-p."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.export import export_hf
from training.generate import KVCache, generate, sample_next
from training.model import ModelConfig, Transformer

VOCAB = 89


def model_for_test(seed: int = 0, **overrides: object) -> Transformer:
    torch.manual_seed(seed)
    base: dict[str, object] = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                   max_seq_len=64, init_std=0.2)  # large init: peaked, seed-sensitive logits
    base.update(overrides)
    return Transformer(ModelConfig.from_dict(base)).eval()


def uncached_greedy(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_uncached_argmax_step_by_step() -> None:
    model = model_for_test(seed=1)
    prompt = [5, 17, 3, 42, 8]
    assert generate(model, [prompt], 20, greedy=True) == [uncached_greedy(model, prompt, 20)]


def test_chunked_prefill_through_the_cache_gives_full_forward_logits() -> None:
    model = model_for_test()
    ids = torch.randint(0, VOCAB, (2, 24))
    cache = KVCache.for_model(model, batch_size=2, max_len=24)
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, :10], 0, cache), model(ids[:, 10:11], 10, cache), model(ids[:, 11:], 11, cache)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_left_padded_batch_matches_each_prompt_alone() -> None:
    model = model_for_test(seed=1)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [30, 31, 32, 33]]
    batched = generate(model, prompts, 12, greedy=True)
    alone = [generate(model, [p], 12, greedy=True)[0] for p in prompts]
    assert batched == alone


def test_greedy_equals_transformers_generate_on_the_exported_model(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = model_for_test(seed=1, tie_embeddings=False,
                           rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    export_hf(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    prompts = torch.tensor([[4, 8, 15, 16, 23, 42], [1, 1, 2, 3, 5, 8]])
    with torch.no_grad():
        theirs = hf.generate(prompts, max_new_tokens=25, do_sample=False, pad_token_id=0)
    assert generate(model, prompts, 25, greedy=True) == theirs[:, prompts.shape[1]:].tolist()


def test_generation_stops_at_eos_and_keeps_it() -> None:
    model = model_for_test()
    reference = generate(model, [[3, 4, 5]], 10, greedy=True)[0]
    eos = reference[2]
    cut = generate(model, [[3, 4, 5]], 10, greedy=True, eos_id=eos)[0]
    assert cut == reference[: reference.index(eos) + 1]



def test_any_of_several_eos_ids_stops_generation_as_in_llama3_configs() -> None:
    # HF configs may give `eos_token_id` as a list (Llama 3 instruct: end_of_text, eom, eot).
    model = model_for_test()
    prompts = [[3, 4, 5], [9, 1]]
    reference = generate(model, prompts, 10, greedy=True)
    stops = [reference[0][4], reference[1][1]]
    cut = generate(model, prompts, 10, greedy=True, eos_id=stops)
    for ref, row in zip(reference, cut, strict=True):
        first = min(i for i, tok in enumerate(ref) if tok in stops)
        assert row == ref[: first + 1]

def test_sampling_is_reproducible_from_a_seed_and_varies_across_seeds() -> None:
    model = model_for_test()
    prompts = [[7, 7, 7]] * 2
    a = generate(model, prompts, 16, temperature=1.5, seed=11)
    assert a == generate(model, prompts, 16, temperature=1.5, seed=11)
    assert a != generate(model, prompts, 16, temperature=1.5, seed=12)


def test_temperature_zero_and_tiny_top_p_reduce_to_greedy() -> None:
    model = model_for_test()
    greedy = generate(model, [[2, 3]], 10, greedy=True)
    assert generate(model, [[2, 3]], 10, temperature=0.0) == greedy
    assert generate(model, [[2, 3]], 10, temperature=1.0, top_p=1e-6, seed=0) == greedy


def test_top_p_never_samples_outside_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(500, 1)
    drawn = sample_next(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    # The nucleus for p=0.7 is {0, 1}: mass 0.5 < 0.7 before token 1, 0.8 >= 0.7 before token 2.
    assert set(drawn.tolist()) == {0, 1}


def test_bad_generation_requests_are_errors() -> None:
    model = model_for_test()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 60], 10)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 3, top_p=0.0)


def _word_tokenizer(path: Path, n_tokens: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, n_tokens)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def test_generate_text_refuses_a_tokenizer_from_a_model_with_a_larger_vocabulary(tmp_path: Path) -> None:
    from training.checkpoint import write_model_checkpoint
    from training.generate import generate_text

    model = model_for_test()
    ckpt = write_model_checkpoint(tmp_path / "ckpt", model.state_dict(), model.cfg.to_dict())
    _word_tokenizer(ckpt / "tokenizer.json", 200)  # left beside the weights by another model's run
    with pytest.raises(ValueError, match=rf"token ids up to 199 but the model's vocab_size is {VOCAB}"):
        generate_text(str(ckpt), "w1 w2", max_new_tokens=3, greedy=True)
    fitting = _word_tokenizer(tmp_path / "own.json", VOCAB)
    assert generate_text(str(ckpt), "w1 w2", tokenizer_path=str(fitting), max_new_tokens=3,
                         greedy=True).startswith("w1 w2")
