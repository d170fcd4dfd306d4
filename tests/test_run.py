"""`refinery run`: the stage driver (skip, resume, --from / --until, fingerprints) on stand-in stages, the
input errors, and the quickstart itself at a tiny scale, end to end, with its outputs checked against
each other."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines import run as run_mod
from pipelines.run import QUICKSTART, STAGE_NAMES, RunConfigError, read_marker, run_pipeline, write_marker

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- the driver, in seconds

@pytest.fixture
def fake_stages(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every stage replaced by one that writes a file in its folder and records that it ran."""
    calls: list[str] = []

    def make(name: str) -> Any:
        def stage(ctx: run_mod.StageContext) -> dict[str, Any]:
            calls.append(name)
            for owned in ctx.stage.owned(ctx.out):
                target = owned / "out.txt" if owned.suffix == "" else owned
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(name)
            return {"ran": name}
        return stage

    monkeypatch.setattr(run_mod, "stage_function", make)
    return calls


def _config(tmp_path: Path, **changes: Any) -> Path:
    cfg = yaml.safe_load(QUICKSTART.read_text())
    cfg["input"]["paths"] = [str(tmp_path / "in.warc.gz")]
    cfg.update(changes)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_second_run_skips_done_stages_and_resumes_an_interrupted_one(tmp_path: Path, fake_stages: list[str]) -> None:
    (tmp_path / "in.warc.gz").write_bytes(b"x")
    config, out = _config(tmp_path), tmp_path / "out"
    result = run_pipeline(config, output=out, data=tmp_path, print_summary=False)
    assert fake_stages == list(STAGE_NAMES)
    assert all(read_marker(out, n)["status"] == "done" for n in STAGE_NAMES)
    assert json.loads((out / "summary.json").read_text())["stages"]["sft"]["status"] == "ran"
    assert result["summaries"]["mix"] == {"ran": "mix"}

    fake_stages.clear()
    run_pipeline(config, output=out, data=tmp_path, print_summary=False)
    assert fake_stages == []

    # Killed inside sft: its marker says running with the same fingerprint, and its files stay for it to resume.
    marker = read_marker(out, "sft")
    write_marker(out, "sft", {"status": "running", "fingerprint": marker["fingerprint"]})
    (out / "sft" / "partial").write_text("checkpoint")
    result = run_pipeline(config, output=out, data=tmp_path, print_summary=False)
    assert fake_stages == ["sft"]  # later stages read sft's files, whose fingerprint is unchanged
    assert (out / "sft" / "partial").exists()
    assert result["stages"]["sft"]["status"] == "resumed"


def test_changed_settings_rerun_that_stage_and_the_stages_that_read_it(tmp_path: Path,
                                                                        fake_stages: list[str]) -> None:
    (tmp_path / "in.warc.gz").write_bytes(b"x")
    out = tmp_path / "out"
    run_pipeline(_config(tmp_path), output=out, data=tmp_path, print_summary=False)
    (out / "dpo" / "stale").write_text("old")
    fake_stages.clear()
    cfg = yaml.safe_load((tmp_path / "run.yaml").read_text())
    cfg["dpo"]["train"]["steps"] = 7
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run_pipeline(tmp_path / "run.yaml", output=out, data=tmp_path, print_summary=False)
    assert fake_stages == ["dpo", "grpo", "export", "report"]  # ablate reads no training stage
    assert not (out / "dpo" / "stale").exists()  # a stage with other settings starts in an empty folder

    fake_stages.clear()
    time.sleep(0.01)
    (tmp_path / "in.warc.gz").write_bytes(b"another input")
    run_pipeline(tmp_path / "run.yaml", output=out, data=tmp_path, print_summary=False)
    assert fake_stages == [n for n in STAGE_NAMES if n != "classify"]


def test_from_and_until_run_part_of_the_pipeline(tmp_path: Path, fake_stages: list[str]) -> None:
    (tmp_path / "in.warc.gz").write_bytes(b"x")
    config, out = _config(tmp_path), tmp_path / "out"
    with pytest.raises(RunConfigError, match="stage classify has not run"):
        run_pipeline(config, output=out, data=tmp_path, start="midtrain", print_summary=False)
    run_pipeline(config, output=out, data=tmp_path, until="mix", print_summary=False)
    assert fake_stages == ["classify", "curate", "tokenizer", "mix"]
    assert read_marker(out, "pretrain") is None
    fake_stages.clear()
    run_pipeline(config, output=out, data=tmp_path, print_summary=False)
    assert fake_stages == list(STAGE_NAMES[4:])
    fake_stages.clear()
    run_pipeline(config, output=out, data=tmp_path, start="sft", until="dpo", print_summary=False)
    assert fake_stages == ["sft", "dpo"]  # --from reruns even a finished stage
    with pytest.raises(RunConfigError, match="comes after"):
        run_pipeline(config, output=out, data=tmp_path, start="dpo", until="sft", print_summary=False)


def test_input_errors_are_one_line_and_say_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipelines.cli import main

    missing = tmp_path / "no_data"
    code = main(["-q", "run", "--data", str(missing), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "no input" in err and "--input" in err and str(missing) in err
    code = main(["-q", "run", str(_config(tmp_path)), "--data", str(tmp_path), "--from", "sft", "--output",
                 str(tmp_path / "o")])
    assert code == 2 and "stage classify has not run" in capsys.readouterr().err


def test_a_crawl_name_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import crawl

    # Nothing listens on port 9 of this machine: the connection is refused, as it is without internet.
    monkeypatch.setattr(crawl, "BASE_URL", "http://127.0.0.1:9/")
    with pytest.raises(crawl.CrawlUnavailable) as e:
        crawl.fetch_crawl("CC-MAIN-2024-22", 1, cache_dir=tmp_path, progress=False)
    message = str(e.value)
    assert "CC-MAIN-2024-22" in message and "internet" in message and "--input PATH" in message
    assert not list(tmp_path.rglob("*.part"))  # no partial download left for a later run to trust
    assert crawl.is_crawl_name("CC-MAIN-2024-22") and not crawl.is_crawl_name("CC-MAIN-2024-22.warc.gz")


# ----------------------------------------------------------------------------- the quickstart, tiny, for real

TINY_MODEL = {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 64}


def tiny_quickstart(data: Path, tmp: Path) -> Path:
    """The quickstart with every budget cut to seconds: 1 WARC shard, a few steps per stage, 4 proxies
    (the fewest the fit accepts), the in-process executor (no Ray start-up)."""
    cfg = yaml.safe_load(QUICKSTART.read_text())
    cfg["output"] = str(tmp / "run")
    cfg["input"]["paths"] = ["${data}/warc/pages/web_pages-00000.warc.gz"]
    cfg["classify"] = {"quality": {"max_per_source": 150, "epoch": 5, "threads": 1},
                       "topic": {"max_per_source": 200, "epoch": 5, "threads": 1}}
    cfg["curate"].update({"config": str(REPO / "pipelines/configs/web.yaml"), "executor": "local"})
    cfg["tokenizer"] = {"vocab_size": 512, "extra": []}
    m = cfg["mix"]
    m.update({"executor": "local", "holdout": 0.1})
    m["web"] = {"buckets": 2, "topics": {"web": ["business", "cs", "math", "sci_tech", "sports", "world", "stat"]}}
    m["sources"] = [{"name": "reference", "paths": ["${data}/text/wikipedia_en/wikitext-2-raw_wiki.test.raw"],
                     "format": "text", "max_bytes": 60000},
                    {"name": "code", "paths": ["stdlib"], "max_bytes": 60000}]
    m["targets"][0]["max_bytes"] = 20000
    m["sweep"].update({"proxies": 4, "model": TINY_MODEL, "tokens": 2048, "seq_len": 32, "batch_size": 4,
                       "eval_batches": 2})
    m["fit"].update({"folds": 2, "candidates": 200, "top_k": 5, "budget_tokens": 6 * 4 * 64})
    cfg["tasks"] = {"kind": "arithmetic", "train": 20, "test": 4, "terms": 2, "max_value": 9}
    model = {**TINY_MODEL, "max_seq_len": 128}
    cfg["pretrain"] = {"model": model, "data": {"seq_len": 64},
                       "optim": {"lr": 3e-3, "warmup": 1, "schedule": "cosine"},
                       "train": {"steps": 6, "batch_size": 4, "eval_every": 3, "eval_batches": 2, "log_every": 1,
                                 "checkpoint_every": 3}}
    short = {"eval_every": 2, "eval_batches": 2, "log_every": 1, "checkpoint_every": 2, "eval_at_start": True}
    cfg["midtrain"].update({"data": {"seq_len": 64}, "optim": {"lr": 1e-3, "warmup": 1},
                            "train": {"steps": 3, "batch_size": 4, **short}})
    cfg["sft"]["chat"].update({"inputs": ["${data}/sft/alpaca_seed_tasks.jsonl"], "max_len": 128})
    cfg["sft"].update({"data": {"seq_len": 128}, "optim": {"lr": 1e-3, "warmup": 1},
                       "train": {"steps": 3, "batch_size": 4, **short}})
    cfg["dpo"]["pairs"].update({"max_len": 128, "holdout": 0.1})
    cfg["dpo"].update({"data": {"seq_len": 128}, "optim": {"lr": 1e-4, "warmup": 1},
                       "train": {"steps": 2, "batch_size": 4, **short}})
    cfg["grpo"]["grpo"].update({"prompts_per_rollout": 2, "samples_per_prompt": 2, "max_new_tokens": 8})
    cfg["grpo"].update({"data": {"seq_len": 128},
                        "train": {"steps": 2, "batch_size": 4, "eval_every": 2, "eval_batches": 1,
                                  "eval_batch_size": 4, "eval_at_start": True, "log_every": 1,
                                  "checkpoint_every": 1}})
    cfg["ablate"].update({"model": TINY_MODEL, "tokens": 1024, "seq_len": 32, "batch_size": 4, "eval_batches": 2,
                          "executor": "local"})
    cfg["report"] = {"prompts": ["The history of", "What is 2 + 3?"], "max_new_tokens": 6}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.integration
def test_the_quickstart_runs_end_to_end_and_its_outputs_agree(shared_data: Path, tmp_path: Path,
                                                              one_thread: None) -> None:
    import numpy as np
    import torch

    from training.checkpoint import load_transformer
    from training.data import load_mix

    config = tiny_quickstart(shared_data, tmp_path)
    result = run_pipeline(config, progress=False)
    out = Path(result["output"])
    s = result["summaries"]
    assert [n for n, r in result["stages"].items() if r["status"] == "ran"] == list(STAGE_NAMES)

    # curate → tokenizer → mix: the counts carry over.
    stats = json.loads((out / "curate/corpus/stats.json").read_text())
    assert s["curate"]["documents_written"] == stats["documents_written"] > 0
    pools = json.loads((out / "mix/pools/pools.json").read_text())
    assert pools["web"]["documents_read"] == stats["documents_written"]
    assert pools["web"]["scored"] == 0  # the classify step's attributes were read, not recomputed
    web = [p for p in pools["pools"] if p["kind"] == "web"]
    assert sum(p["documents"] + p["heldout_documents"] for p in web) == stats["documents_written"]
    curated_tokens = json.loads((out / "ablate/tokens/curated/manifest.json").read_text())
    assert curated_tokens["total_documents"] == stats["documents_written"]
    specs, _ = load_mix(s["mix"]["manifest"])
    assert abs(sum(p.weight for p in specs) - 1) < 1e-6 and all(p.manifest.is_file() for p in specs)
    assert len(json.loads((out / "mix/sweep/results.json").read_text())["proxies"]) == 4

    # Every training stage: its last checkpoint loads, with the tokenizer's vocabulary, from the stage before.
    vocab = json.loads((out / "tokenizer/tokenizer.json").read_text())
    n_vocab = max(vocab["model"]["vocab"].values()) + 1
    init = None
    for stage in ("pretrain", "midtrain", "sft", "dpo", "grpo"):
        cfg = yaml.safe_load((out / stage / "config.yaml").read_text())
        assert cfg["train"].get("init_from") == init
        init = str(out / stage)
        model = load_transformer(out / stage)
        assert model.cfg.vocab_size >= n_vocab
        steps = yaml.safe_load(config.read_text())[stage]["train"]["steps"]
        assert s[stage]["step"] == steps and (out / stage / "samples.json").is_file()
        assert len(s[stage]["samples"]) == 2
    sft = json.loads((out / "sft/chat/manifest.json").read_text())
    assert sft["kind"] == "chat" and sft["examples"] > 20  # the instruction rows and the task's 20 solutions
    assert json.loads((out / "dpo/pairs/manifest.json").read_text())["kind"] == "preference"
    rewards = [json.loads(line).get("reward") for line in (out / "grpo/metrics.jsonl").read_text().splitlines()]
    assert any(r is not None for r in rewards) and s["grpo"]["initial_eval_reward"] is not None

    # The export: transformers loads it and computes our model's logits; its tokenizer knows the chat template.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(out / "model")
    ours = load_transformer(out / "grpo")
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ours(ids))  # bit for bit, as docs/decisions.md says
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert s["export"]["max_logit_diff"] == 0.0

    # The ablation: three corpora, two seeds each, every target evaluated.
    ab = json.loads((out / "ablate/report.json").read_text())
    assert set(ab["table"]) == {"raw", "curated", "mixed"} and ab["seeds"] == [0, 1]
    assert all(np.isfinite(ab["table"][a][t]["mean"]) for a in ab["table"] for t in ab["targets"])
    assert ab["documents"]["raw"] > ab["documents"]["curated"]

    # The report names every stage and embeds its charts; report.md's images exist.
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == int(s["report"]["figures"]) >= 8
    for name in ("Curation funnel", "Duplicate clusters", "Data mixture", "Loss curves", "RL reward",
                 "Sample generations", "Data-quality ablation"):
        assert name in page
    md = (out / "report.md").read_text()
    for line in md.splitlines():
        if line.startswith("!["):
            assert (out / line[line.index("(") + 1:-1]).is_file()
    if shutil.which("chromium"):  # tests/test_report_html.py checks the page itself, and fails in CI without it
        from test_report_html import browser_check

        assert browser_check(out / "report.html", tmp_path)["broken"] == 0

    # A second run finds every stage done and trains nothing.
    before = (out / "grpo/metrics.jsonl").stat().st_mtime_ns
    again = run_pipeline(config, progress=False, print_summary=False)
    assert {r["status"] for r in again["stages"].values()} == {"skipped (done)"}
    assert (out / "grpo/metrics.jsonl").stat().st_mtime_ns == before
