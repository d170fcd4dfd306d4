"""Pools: topic × quality buckets cut at per-topic quantiles, named sources, held-out slices, each
tokenized once; bad pools and targets are clear errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from mixing_data import make_inputs, mix_config

from pipelines.mix import tokenize_fn
from proxy_mix.config import MixConfigError, config_from_dict
from proxy_mix.pools import build_pools, load_pools

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inputs(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_inputs(shared_data, tmp_path_factory.mktemp("mix_inputs"))


def _build(cfg_dict: dict, score=None) -> dict:  # noqa: ANN001
    cfg = config_from_dict(cfg_dict)
    return build_pools(cfg, tokenize_fn(cfg.tokenizer), score, log=lambda _: None)


def test_pools_are_topic_by_quality_buckets_plus_sources(inputs: dict[str, Path], tmp_path: Path) -> None:
    summary = _build(mix_config(inputs, tmp_path / "out", web={"buckets": 3}))
    pools = {p["name"]: p for p in summary["pools"]}
    assert sorted(pools) == ["news.q0", "news.q1", "news.q2", "reference", "science.q0", "science.q1", "science.q2"]
    for topic in ("news", "science"):
        buckets = [pools[f"{topic}.q{b}"] for b in range(3)]
        docs = [p["documents"] + p["heldout_documents"] for p in buckets]
        assert max(docs) - min(docs) <= 0.25 * max(docs)  # quantile buckets: about equal document counts
        ranges = [p["quality_range"] for p in buckets]
        assert ranges[0][0] == 0.0 and ranges[-1][1] == 1.0
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(2))  # q0 lowest, contiguous
    assert summary["web"]["documents_read"] == 240 and summary["web"]["scored"] == 0  # attributes were used
    total_docs = sum(p["documents"] + p["heldout_documents"] for n, p in pools.items() if n != "reference")
    assert total_docs == 240  # every web document in exactly one pool
    for p in pools.values():
        manifest = json.loads(Path(p["manifest"]).read_text())
        assert manifest["total_tokens"] == p["tokens"] > 0 and manifest["complete"]
    held = sum(p["heldout_documents"] for p in pools.values())
    assert 0.04 < held / sum(p["documents"] + p["heldout_documents"] for p in pools.values()) < 0.2
    assert [t["name"] for t in summary["targets"]] == ["ref", "web"]
    assert summary["targets"][0]["manifest"] == pools["reference"]["heldout_manifest"]


def test_a_rebuild_reuses_the_pools_and_another_config_is_refused(inputs: dict[str, Path], tmp_path: Path) -> None:
    cfg = mix_config(inputs, tmp_path / "out")
    first = _build(cfg)
    stamp = (tmp_path / "out/pools/pools.json").stat().st_mtime_ns
    assert _build(cfg) == first
    assert (tmp_path / "out/pools/pools.json").stat().st_mtime_ns == stamp
    assert load_pools(config_from_dict(cfg)) == first
    with pytest.raises(MixConfigError, match="another config"):
        _build(mix_config(inputs, tmp_path / "out", holdout=0.2))


def test_documents_without_attributes_are_scored_by_the_given_classifiers(inputs: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    plain = tmp_path / "plain.jsonl"
    with gzip.open(inputs["corpus"] / "documents/00000-c4.jsonl.gz", "rt") as f:
        rows = [json.loads(x) for x in f]
    plain.write_text("\n".join(json.dumps({"id": r["id"], "text": r["text"]}) for r in rows))
    calls: list[int] = []

    def score(texts: list[str]) -> tuple[list[float], list[str]]:
        calls.append(len(texts))
        return [len(t) % 97 / 97 for t in texts], ["long" if len(t) > 1500 else "short" for t in texts]

    cfg = mix_config(inputs, tmp_path / "out", web={"corpus": [str(plain)], "topic_model": "given"},
                     targets=[{"name": "ref", "pool": "reference"}])
    summary = _build(cfg, score)
    assert sum(calls) == 240 and summary["web"]["scored"] == 240
    assert {p["topic"] for p in summary["pools"] if p["kind"] == "web"} == {"long", "short"}
    cfg = mix_config(inputs, tmp_path / "out2", web={"corpus": [str(plain)]}, targets=[{"name": "r", "pool": "reference"}])
    with pytest.raises(MixConfigError, match="lack quality.score"):
        _build(cfg)


def test_a_pool_with_no_documents_is_an_error(inputs: dict[str, Path], tmp_path: Path) -> None:
    cfg = mix_config(inputs, tmp_path / "a", web={"topics": {"news": ["news"], "sports": ["sports"]}},
                     targets=[{"name": "ref", "pool": "reference"}])
    with pytest.raises(MixConfigError, match="pool topic 'sports' has no documents"):
        _build(cfg)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n   \n")
    cfg = mix_config(inputs, tmp_path / "b", sources=[{"name": "blank", "paths": [str(empty)], "format": "text"}],
                     targets=[{"name": "w", "pool": "news.q0"}])
    with pytest.raises(MixConfigError, match="pool 'blank' has no documents"):
        _build(cfg)


def test_a_target_set_that_does_not_exist_is_an_error(inputs: dict[str, Path], tmp_path: Path) -> None:
    cfg = mix_config(inputs, tmp_path / "out", targets=[{"name": "x", "pool": "sports.q1"}])
    with pytest.raises(MixConfigError, match="target 'x' names pool 'sports.q1', which does not exist"):
        _build(cfg)
    with pytest.raises(MixConfigError, match="path not found"):
        _build(mix_config(inputs, tmp_path / "o2", targets=[{"name": "x", "paths": [str(tmp_path / "nope.txt")]}]))
    with pytest.raises(MixConfigError, match="exactly one of `pool`"):
        config_from_dict(mix_config(inputs, tmp_path, targets=[{"name": "x"}]))
    with pytest.raises(MixConfigError, match="fit.targets names 'wiki'"):
        config_from_dict(mix_config(inputs, tmp_path, fit={"targets": ["wiki"]}))


def test_config_typos_are_named(inputs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MixConfigError, match="unknown key 'sweep.proxie'.*did you mean 'proxies'"):
        config_from_dict(mix_config(inputs, tmp_path, sweep={"proxie": 3}))
    with pytest.raises(MixConfigError, match="sweep.tokens must be an integer"):
        config_from_dict(mix_config(inputs, tmp_path, sweep={"tokens": "many"}))
