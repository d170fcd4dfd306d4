"""The commands of docs/mixing.md, in its order, on the shipped config (budgets shrunk for a test):
classify train, tokenizer train, curate with the classify step, mix pools / sweep / fit / upsample /
validate; and bad input as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.cli import main

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _shrink(cfg: dict[str, Any], tmp: Path, corpus: Path, labels: list[str]) -> dict[str, Any]:
    cfg["output"] = str(tmp / "mix")
    cfg["tokenizer"] = str(tmp / "tok/tokenizer.json")
    cfg["web"].update({"corpus": [str(corpus)], "quality_model": str(tmp / "clf/quality"),
                       "topic_model": str(tmp / "clf/topic"), "topics": {"web": labels}})
    cfg["holdout"] = 0.1
    for s in cfg["sources"]:
        s["max_bytes"] = 500_000 if s["name"] == "code" else 150_000
    cfg["targets"] = [t for t in cfg["targets"] if t["name"] != "c4"]
    cfg["targets"][0]["max_bytes"] = 30_000
    cfg["sweep"].update({"proxies": 5, "tokens": 4096, "seq_len": 32, "batch_size": 4, "eval_batches": 2})
    cfg["fit"].update({"candidates": 500, "top_k": 10, "folds": 2, "budget_tokens": 100_000})
    cfg["validate"].update({"model": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 64},
                            "tokens": 4096, "seq_len": 32, "batch_size": 4, "eval_batches": 2})
    return cfg


@pytest.mark.slow
def test_the_mixing_guide_runs_end_to_end(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    monkeypatch.chdir(REPO)  # the shipped config's paths are relative to the repository root
    data = str(shared_data)
    code, out, _ = _run(["classify", "train", "--kind", "quality", "-o", str(tmp_path / "clf/quality"),
                         "--data", data, "--max-per-source", "300", "--threads", "1"], capsys)
    assert code == 0 and "held-out accuracy" in out
    code, out, _ = _run(["classify", "train", "--kind", "topic", "-o", str(tmp_path / "clf/topic"),
                         "--data", data, "--max-per-source", "800", "--threads", "1"], capsys)
    assert code == 0
    labels = json.loads((tmp_path / "clf/topic/model.json").read_text())["labels"]
    code, _, _ = _run(["tokenizer", "train", "-i", f"{data}/text/wikitext2/valid.txt",
                       f"{data}/web_text/c4_en_sample/c4_en_train_first1000.jsonl", "--vocab-size", "512",
                       "-o", str(tmp_path / "tok/tokenizer.json")], capsys)
    assert code == 0

    # A curated corpus whose documents carry the classify step's attributes.
    curate_cfg = tmp_path / "curate.yaml"
    curate_cfg.write_text(yaml.safe_dump({"name": "wet", "steps": [{"classify": {
        "quality_model": str(tmp_path / "clf/quality"), "topic_model": str(tmp_path / "clf/topic")}}]}))
    code, _, err = _run(["curate", str(curate_cfg), "-i", f"{data}/wet/jeffharwell_CC-MAIN-2016-50_filter_test_1.wet.gz",
                         f"{data}/wet/jeffharwell_CC-MAIN-2016-50_fragment3.wet.gz", "-o", str(tmp_path / "curated")],
                        capsys)
    assert code == 0, err

    cfg = _shrink(yaml.safe_load((REPO / "pipelines/configs/mix.yaml").read_text()), tmp_path,
                  tmp_path / "curated", labels)
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump(cfg))
    code, out, err = _run(["mix", "pools", str(config)], capsys)
    assert code == 0, err
    pools = json.loads((tmp_path / "mix/pools/pools.json").read_text())
    assert pools["web"]["scored"] == 0 and pools["web"]["documents_read"] > 20  # the step's attributes were read
    assert {p["name"] for p in pools["pools"]} == {"web.q0", "web.q1", "reference", "arxiv", "code"}
    code, out, err = _run(["mix", "sweep", str(config), "--executor", "local"], capsys)
    assert code == 0, err
    assert "5/5 proxies ok" in out
    code, out, err = _run(["mix", "fit", str(config)], capsys)
    assert code == 0, err
    assert json.loads(out)["chosen_model"] in ("lightgbm", "loglinear", "linear")
    code, out, err = _run(["mix", "upsample", str(config)], capsys)
    assert code == 0, err
    code, out, err = _run(["mix", "validate", str(config), "--executor", "local"], capsys)
    assert code == 0, err
    assert "| searched" in out and "| natural" in out and "| uniform" in out and "| upsampled" in out


def test_bad_mixing_input_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(["classify", "train", "--kind", "quality", "-o", str(tmp_path / "m"),
                         "--positive", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "give both --positive and --negative" in err
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"tokenizer": "t.json", "sources": [{"name": "a", "paths": ["x"]}],
                                      "targets": [{"name": "t", "pool": "a"}], "sweep": {"proxys": 3}}))
    code, _, err = _run(["mix", "pools", str(config)], capsys)
    assert code == 2 and err.count("\n") == 1 and "did you mean 'proxies'" in err
    config.write_text(yaml.safe_dump({"tokenizer": "t.json", "sources": [{"name": "a", "paths": ["x"]}],
                                      "targets": [{"name": "t", "pool": "a"}], "output": str(tmp_path / "o")}))
    code, _, err = _run(["mix", "fit", str(config)], capsys)
    assert code == 2 and "run `refinery mix pools CONFIG` first" in err
