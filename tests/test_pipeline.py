"""The curation pipeline end to end on real WARCs: stats, outputs, executors, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.config import CurationConfig
from curation.pipeline import RunContext, Shard, curate, process_shard
from curation.registry import ConfigError

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "pipelines" / "configs" / "web.yaml"


def _pages(shared_data: Path, n: int) -> list[str]:
    return sorted(str(p) for p in (shared_data / "warc" / "pages").glob("*.warc.gz"))[:n]


def _corpus(out: Path) -> list[dict]:
    rows = []
    for f in sorted((out / "documents").rglob("*.parquet")):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


@pytest.fixture(scope="module")
def local_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("local")
    stats = curate(WEB, _pages(shared_data, 2), out, executor="local", progress=False)
    return out, stats


def test_stats_chain_every_step_and_count_every_drop(local_run: tuple[Path, dict]) -> None:
    out, stats = local_run
    steps = stats["steps"]
    names = [s["name"] for s in steps]
    assert names[0] == "read" and names[1] == "extract" and names[-2:] == ["dedup_exact", "dedup_minhash"]
    for prev, cur in zip(steps, steps[1:], strict=False):
        assert cur["docs_in"] == prev["docs_out"], (prev["name"], cur["name"])
    for s in steps:
        # Nothing is lost silently: every document that did not come out was dropped for a reason.
        assert s["docs_in"] - s["docs_out"] == sum(s["dropped"].values()), s["name"]
    assert stats["documents_written"] == steps[-1]["docs_out"] > 0
    assert json.loads((out / "stats.json").read_text())["documents_written"] == stats["documents_written"]
    report = (out / "report.md").read_text()
    assert "gopher_quality" in report and (out / "funnel.png").stat().st_size > 1000


def test_written_corpus_has_dolma_fields_scores_and_unique_ids(local_run: tuple[Path, dict]) -> None:
    out, stats = local_run
    rows = _corpus(out)
    assert len(rows) == stats["documents_written"]
    assert len({r["id"] for r in rows}) == len(rows)
    assert set(rows[0]) == {"id", "text", "source", "added", "created", "metadata"}
    meta = json.loads(rows[0]["metadata"])
    assert meta["url"].startswith("http") and meta["lang"] == "en"
    assert "warc_record_id" in meta and "gopher.word_count" in meta["attributes"]
    assert not any(k.startswith("_") for r in rows for k in json.loads(r["metadata"])["attributes"])
    assert stats["languages"] == {"en": len(rows)}


def test_rerun_of_a_finished_run_changes_nothing(shared_data: Path, local_run: tuple[Path, dict]) -> None:
    out, stats = local_run
    before = _corpus(out)
    again = curate(WEB, _pages(shared_data, 2), out, executor="local", progress=False)
    assert again["documents_written"] == stats["documents_written"]
    assert _corpus(out) == before


def test_resuming_with_another_config_is_refused(shared_data: Path, local_run: tuple[Path, dict]) -> None:
    out, _ = local_run
    cfg = CurationConfig.load(WEB)
    cfg.steps = cfg.steps[:3]
    with pytest.raises(ConfigError, match="different config"):
        curate(cfg, _pages(shared_data, 2), out, progress=False)


def test_malformed_inputs_are_counted_and_the_job_goes_on(shared_data: Path, tmp_path: Path) -> None:
    bad = sorted(str(p) for p in (shared_data / "warc" / "malformed").iterdir())
    cfg = CurationConfig.from_dict({"steps": [{"extract": {}}], "output": {"format": "dolma"}})
    stats = curate(cfg, bad + _pages(shared_data, 1), tmp_path, progress=False)
    read = stats["steps"][0]
    assert read["errors"].get("read.malformed", 0) >= 1
    assert read["samples"] and "offset" in read["samples"][0]
    assert stats["documents_written"] > 100
    assert list((tmp_path / "documents").rglob("*.jsonl.gz"))


def test_local_and_ray_executors_write_the_same_corpus(
    shared_data: Path, local_run: tuple[Path, dict], tmp_path: Path
) -> None:
    out, stats = local_run
    ray_stats = curate(WEB, _pages(shared_data, 2), tmp_path, executor="ray", progress=False)
    assert ray_stats["documents_written"] == stats["documents_written"]
    strip = [{k: v for k, v in r.items() if k != "added"} for r in _corpus(out)]
    assert [{k: v for k, v in r.items() if k != "added"} for r in _corpus(tmp_path)] == strip


def test_killed_run_resumes_without_loss_or_duplicates(
    shared_data: Path, local_run: tuple[Path, dict], tmp_path: Path
) -> None:
    out, _ = local_run
    cmd = [sys.executable, "-m", "pipelines.cli", "-q", "curate", str(WEB), "--input",
           *_pages(shared_data, 2), "--output", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker_dir = tmp_path / "_work" / "stage1"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list(marker_dir.glob("*.done.json")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "stats.json").exists()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    strip = [{k: v for k, v in r.items() if k != "added"} for r in _corpus(out)]
    assert [{k: v for k, v in r.items() if k != "added"} for r in _corpus(tmp_path)] == strip


def test_remote_inputs_are_cached_in_the_configured_cache_dir(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import curation.read.inputs as inputs

    default_cache = tmp_path / "default_cache"
    monkeypatch.setattr(inputs, "DEFAULT_CACHE_DIR", default_cache)
    page = _pages(shared_data, 1)[0]
    url = Path(page).as_uri()  # file:// goes through the download cache like https://
    cache = tmp_path / "cache"
    cfg = CurationConfig.from_dict({"read": {"cache_dir": str(cache)}, "steps": [{"extract": {}}]})
    stats = curate(cfg, [url], tmp_path / "out", progress=False)
    assert stats["documents_written"] > 0
    assert inputs.cache_path(url, cache).is_file()
    assert not default_cache.exists()


def test_an_input_that_cannot_be_opened_is_retried_by_the_rerun(shared_data: Path, tmp_path: Path) -> None:
    cfg = CurationConfig.from_dict({"steps": [{"extract": {}}]})
    ctx = RunContext(config=cfg.to_dict(), work=str(tmp_path / "_work"), output=str(tmp_path), added="t")
    # The input vanished between expansion and its task (a failed download, an unmounted disk).
    gone = Shard("00000-gone", str(tmp_path / "gone.warc.gz"))
    result = process_shard(ctx, gone)
    assert result["unavailable"] and result["steps"][0]["errors"] == {"read.unavailable": 1}
    assert not (tmp_path / "_work" / "stage1" / "00000-gone.done.json").exists()  # so a rerun retries it
    done = process_shard(ctx, Shard("00001-page", _pages(shared_data, 1)[0]))
    assert "unavailable" not in done and done["rows"] > 0
    assert (tmp_path / "_work" / "stage1" / "00001-page.done.json").exists()


def test_dedup_steps_with_different_survivor_rules_are_refused() -> None:
    with pytest.raises(ConfigError, match="survivor"):
        CurationConfig.from_dict({"dedup": [{"dedup_exact": {"survivor": "latest"}}, {"dedup_minhash": {}}]})
