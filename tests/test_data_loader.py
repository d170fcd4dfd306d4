"""The mixture loader over token shards: determinism, weights, caps, ranks, resume, bad shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from curation.executor import LocalExecutor
from curation.tokenize import tokenize_corpus
from curation.tokenizer import train_tokenizer
from training.data import MixtureLoader, TokenShards, bytes_per_token, eval_batches

SEQ = 8


def write_pool(root: Path, tokens: np.ndarray, shards: int = 2, dtype: str = "uint16",
               vocab_size: int = 65_536, text_bytes: int | None = None) -> Path:
    """A token manifest in the documented format, its stream split over `shards` files."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i, part in enumerate(np.array_split(tokens.astype(dtype), shards)):
        np.save(root / f"s{i}.npy", part)
        records.append({"path": f"s{i}.npy", "tokens": len(part), "dtype": dtype,
                        "nbytes": (root / f"s{i}.npy").stat().st_size})
    manifest = {"format": "refinery.tokens/1", "dtype": dtype, "vocab_size": vocab_size, "eos_id": 0,
                "total_tokens": len(tokens), "total_text_bytes": text_bytes, "shards": records}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / "manifest.json"


@pytest.fixture
def pools(tmp_path: Path) -> tuple[Path, Path]:
    # Token value = position in the pool (+ 30,000 for pool B): a row tells its pool and window.
    a = write_pool(tmp_path / "a", np.arange(8 * 50 + 1))
    b = write_pool(tmp_path / "b", 30_000 + np.arange(8 * 30 + 1), shards=3)
    return a, b


def mix(a: Path, b: Path, wa: float = 3.0, wb: float = 1.0, ra: float | None = None,
        rb: float | None = None, seed: int = 7) -> dict:
    return {"seed": seed, "pools": [{"name": "a", "manifest": str(a), "weight": wa, "max_repetition": ra},
                                    {"name": "b", "manifest": str(b), "weight": wb, "max_repetition": rb}]}


def take(loader: MixtureLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def test_windows_are_contiguous_and_targets_are_inputs_shifted(pools) -> None:
    loader = MixtureLoader(mix(*pools), seq_len=SEQ, global_batch_size=4)
    for x, y in take(loader, 5):
        assert x.dtype == torch.long and x.shape == y.shape == (4, SEQ)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(y, x + 1)  # each pool's stream counts up by one
        assert bool(((x[:, 0] % 30_000) % SEQ == 0).all())  # windows start at multiples of seq_len


def test_same_seed_gives_same_batches_and_another_seed_differs(pools) -> None:
    first = [x for x, _ in take(MixtureLoader(mix(*pools), seq_len=SEQ, global_batch_size=4), 6)]
    again = [x for x, _ in take(MixtureLoader(mix(*pools), seq_len=SEQ, global_batch_size=4), 6)]
    other = [x for x, _ in take(MixtureLoader(mix(*pools, seed=8), seq_len=SEQ, global_batch_size=4), 6)]
    assert all(torch.equal(p, q) for p, q in zip(first, again, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(first, other, strict=True))


def test_mix_weights_are_respected(tmp_path: Path) -> None:
    a = write_pool(tmp_path / "a", np.arange(8 * 400 + 1))
    b = write_pool(tmp_path / "b", 30_000 + np.arange(8 * 400 + 1))
    loader = MixtureLoader(mix(a, b, wa=3.0, wb=1.0), seq_len=SEQ, global_batch_size=16)
    rows = torch.cat([x[:, 0] for x, _ in take(loader, 150)])
    share_a = float((rows < 30_000).float().mean())
    # 2,400 rows at p = 0.75: the standard error is 0.009, so 0.03 is over 3 sigma.
    assert abs(share_a - 0.75) < 0.03


def test_repetition_cap_is_honoured_and_loader_stops_when_all_pools_are_spent(pools) -> None:
    a, b = pools  # a: 50 windows, b: 30 windows
    loader = MixtureLoader(mix(a, b, ra=2.0, rb=1.0), seq_len=SEQ, global_batch_size=10)
    starts = Counter(int(v) for x, _ in loader for v in x[:, 0])
    seen_a = Counter(v for v in starts.elements() if v < 30_000)
    seen_b = Counter(v for v in starts.elements() if v >= 30_000)
    # 2 * 50 + 30 = 130 windows = 13 full batches: every window served exactly its cap.
    assert len(seen_a) == 50 and set(seen_a.values()) == {2}
    assert len(seen_b) == 30 and set(seen_b.values()) == {1}
    assert loader.epochs() == {"a": 2.0, "b": 1.0}
    with pytest.raises(StopIteration):
        next(loader)



def test_fractional_cap_counts_whole_windows_despite_float_rounding(pools) -> None:
    a, b = pools  # a: 50 windows; 0.58 * 50 is 28.999999999999996 in floats
    loader = MixtureLoader(mix(a, b, wb=0.0, ra=0.58), seq_len=SEQ, global_batch_size=1)
    assert sum(x.shape[0] for x, _ in loader) == 29


def test_infinite_repetition_cap_is_a_clear_error(pools) -> None:
    a, b = pools
    with pytest.raises(ValueError, match="max_repetition must be a finite number"):
        MixtureLoader(mix(a, b, ra=float("inf")), seq_len=SEQ, global_batch_size=2)

def test_exhausted_pool_weight_goes_to_the_others(pools) -> None:
    a, b = pools
    loader = MixtureLoader(mix(a, b, wa=1.0, wb=1.0, rb=1.0), seq_len=SEQ, global_batch_size=10)
    batches = [x[:, 0] for x, _ in take(loader, 20)]  # 200 rows: b (30 windows) runs out early
    late = torch.cat(batches[-5:])
    assert bool((late < 30_000).all())
    assert loader.consumed[1] == 30


def test_rank_slices_interleave_into_the_global_batch(pools) -> None:
    whole = take(MixtureLoader(mix(*pools), seq_len=SEQ, global_batch_size=6), 4)
    ranks = [take(MixtureLoader(mix(*pools), seq_len=SEQ, global_batch_size=6, rank=r, world_size=3), 4)
             for r in range(3)]
    for step, (x, y) in enumerate(whole):
        for r in range(3):
            assert torch.equal(ranks[r][step][0], x[r::3]) and torch.equal(ranks[r][step][1], y[r::3])


def test_resume_from_state_dict_gives_the_same_next_batches(pools) -> None:
    loader = MixtureLoader(mix(*pools, ra=3.0), seq_len=SEQ, global_batch_size=4)
    take(loader, 17)  # past pool b's first epoch, so epoch permutations are exercised
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    expected = take(loader, 10)
    resumed = MixtureLoader(mix(*pools, ra=3.0), seq_len=SEQ, global_batch_size=4)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, take(resumed, 10), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    wrong = MixtureLoader(mix(*pools), seq_len=SEQ * 2, global_batch_size=4)
    with pytest.raises(ValueError, match="seq_len"):
        wrong.load_state_dict(state)


def test_single_manifest_and_yaml_mix_with_relative_paths(pools, tmp_path: Path) -> None:
    a, _ = pools
    one = MixtureLoader(a, seq_len=SEQ, global_batch_size=2)
    assert one.names == ["a"] and next(one)[0].shape == (2, SEQ)
    assert MixtureLoader(a.parent, seq_len=SEQ, global_batch_size=2).names == ["a"]
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(
        {"seed": 3, "pools": [{"name": "web", "manifest": "a/manifest.json", "weight": 1}]}))
    loader = MixtureLoader(tmp_path / "mix.yaml", seq_len=SEQ, global_batch_size=2)
    assert loader.names == ["web"] and loader.seed == 3
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"pools": [{"manifest": "a", "wieght": 2}]}))
    with pytest.raises(ValueError, match="wieght"):
        MixtureLoader(tmp_path / "typo.yaml", seq_len=SEQ, global_batch_size=2)


def test_reads_across_shard_boundaries_with_few_open_maps(pools) -> None:
    _, b = pools
    shards = TokenShards(b, max_open=1)
    assert np.array_equal(shards.read(0, len(shards)), 30_000 + np.arange(len(shards)))
    assert np.array_equal(shards.read(75, 10), 30_075 + np.arange(10))  # spans shards 0 and 1
    with pytest.raises(IndexError):
        shards.read(len(shards) - 2, 5)


def test_missing_shard_is_a_clear_error_naming_it(pools) -> None:
    a, _ = pools
    (a.parent / "s1.npy").unlink()
    with pytest.raises(FileNotFoundError, match="s1.npy"):
        TokenShards(a)


def test_truncated_shard_is_a_clear_error(pools) -> None:
    a, _ = pools
    data = (a.parent / "s0.npy").read_bytes()
    (a.parent / "s0.npy").write_bytes(data[:-6])
    with pytest.raises(ValueError, match="s0.npy.*truncated"):
        TokenShards(a)
    m = json.loads(a.read_text())
    for s in m["shards"]:
        del s["nbytes"]  # without the size check, the numpy-level length check still catches it
    a.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="s0.npy.*truncated"):
        TokenShards(a)


def test_shard_dtype_disagreeing_with_manifest_is_an_error(tmp_path: Path) -> None:
    m = write_pool(tmp_path / "p", np.arange(100), shards=1)
    np.save(tmp_path / "p" / "s0.npy", np.arange(100, dtype=np.uint32))
    data = json.loads(m.read_text())
    data["shards"][0]["nbytes"] = (tmp_path / "p" / "s0.npy").stat().st_size
    m.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="dtype uint32"):
        TokenShards(m)


def test_vocab_that_does_not_fit_dtype_or_model_is_an_error(tmp_path: Path) -> None:
    bad = write_pool(tmp_path / "bad", np.arange(100), vocab_size=128_256)
    with pytest.raises(ValueError, match="does not fit dtype uint16"):
        TokenShards(bad)
    ok = write_pool(tmp_path / "ok", np.arange(100), vocab_size=1000)
    with pytest.raises(ValueError, match="model's vocab_size 512"):
        MixtureLoader(ok, seq_len=SEQ, global_batch_size=2, vocab_size=512)
    # The held-out set too: otherwise an id past the embedding fails only at the first evaluation.
    with pytest.raises(ValueError, match="model's vocab_size 512"):
        next(eval_batches(ok, seq_len=SEQ, batch_size=2, vocab_size=512))


def test_eval_batches_are_fixed_contiguous_windows(tmp_path: Path) -> None:
    m = write_pool(tmp_path / "p", np.arange(8 * 10 + 1), text_bytes=324)
    batches = list(eval_batches(m, seq_len=SEQ, batch_size=4))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]).flatten(), torch.arange(80))
    assert len(list(eval_batches(m, seq_len=SEQ, batch_size=4, max_batches=2))) == 2
    assert bytes_per_token(m) == pytest.approx(324 / 81)


@pytest.mark.integration
def test_loader_reads_shards_written_by_tokenize(shared_data: Path, tmp_path: Path) -> None:
    c4 = shared_data / "web_text" / "c4_en_sample" / "c4_en_train_first1000.jsonl"
    texts = [json.loads(line)["text"] for line, _ in zip(c4.open(), range(60), strict=False)]
    (tmp_path / "corpus").mkdir()
    for i in range(2):
        pq.write_table(pa.table({"id": [str(j) for j in range(30)], "text": texts[i * 30:(i + 1) * 30],
                                 "source": ["c4"] * 30}), tmp_path / "corpus" / f"p{i}.parquet")
    tok = train_tokenizer([tmp_path / "corpus"], vocab_size=400, output=tmp_path / "tok" / "tokenizer.json")
    tokenize_corpus(tmp_path / "corpus", tok, tmp_path / "tokens", executor=LocalExecutor(progress=False))
    shards = TokenShards(tmp_path / "tokens")
    stream = np.concatenate([np.load(tmp_path / "tokens" / f"p{i}.npy") for i in range(2)])
    assert np.array_equal(shards.read(0, len(shards)), stream)
    assert int((stream == shards.eos_id).sum()) == 60
    assert shards.bytes_per_token == pytest.approx(sum(len(t.encode()) for t in texts) / len(stream))
    x, y = next(MixtureLoader(tmp_path / "tokens", seq_len=32, global_batch_size=4, vocab_size=400))
    assert x.shape == (4, 32) and int(x.max()) < 400
