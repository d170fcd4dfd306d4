"""`--keep-rejected`: every document a run reads ends in documents/ or in rejected/, each reject names
the step and reason the stats count, and a killed run resumes to the same rejects."""

from __future__ import annotations

import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from curation.config import CurationConfig
from curation.document import Document
from curation.pipeline import OutputConflictError, _check_rejects_complete, curate
from curation.rejected import RejectSink
from curation.step import Filter, Mapper, Step

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "pipelines" / "configs" / "web.yaml"


def _pages(shared_data: Path, n: int) -> list[str]:
    return sorted(str(p) for p in (shared_data / "warc" / "pages").glob("*.warc.gz"))[:n]


def _config() -> CurationConfig:
    """web.yaml with its last filter moved after dedup, so drops happen in all three phases."""
    cfg = CurationConfig.load(WEB)
    fineweb = next(s for s in cfg.steps if s.name == "fineweb")
    cfg.steps.remove(fineweb)
    cfg.after_dedup = [fineweb]
    return cfg


def _read(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    with gzip.open(path) as f:
        return [orjson.loads(line) for line in f]


def _meta(row: dict) -> dict:
    return row["metadata"] if isinstance(row["metadata"], dict) else json.loads(row["metadata"])


def _tree(out: Path, folder: str) -> dict[str, list[dict]]:
    """Rows (without the run's `added` time) of every file under out/folder, by relative path."""
    return {f.relative_to(out).as_posix(): [{k: v for k, v in r.items() if k != "added"} for r in _read(f)]
            for f in sorted((out / folder).rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def kept(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("kept")
    return out, curate(_config(), _pages(shared_data, 2), out, progress=False, keep_rejected=True)


@pytest.mark.integration
def test_every_document_read_is_written_or_kept_as_rejected(kept: tuple[Path, dict]) -> None:
    out, stats = kept
    written = [r for rows in _tree(out, "documents").values() for r in rows]
    rejected = [r for rows in _tree(out, "rejected").values() for r in rows]
    assert len(written) == stats["documents_written"] > 0
    assert len(written) + len(rejected) == stats["documents_read"]  # nothing lost
    assert not {r["id"] for r in written} & {r["id"] for r in rejected}
    assert len({r["id"] for r in written + rejected}) == stats["documents_read"]
    assert [f["path"] for f in stats["rejected_files"]] == sorted(_tree(out, "rejected"))
    assert all(f["path"].startswith("rejected/common-crawl/") for f in stats["rejected_files"])
    assert sum(f["documents"] for f in stats["rejected_files"]) == len(rejected)
    report = (out / "report.md").read_text()
    assert f"**{len(rejected):,} dropped documents were kept** in `rejected/`" in report


@pytest.mark.integration
def test_each_reject_names_the_step_and_reason_the_stats_count(kept: tuple[Path, dict]) -> None:
    out, stats = kept
    rejected = [_meta(r) for rows in _tree(out, "rejected").values() for r in rows]
    found = Counter((m["rejected"]["step"], m["rejected"]["reason"]) for m in rejected)
    counted = Counter({(s["name"], reason): n for s in stats["steps"] for reason, n in s["dropped"].items()})
    assert found == counted
    steps = {step for step, _ in found}
    assert {"extract", "language", "dedup_exact", "fineweb"} <= steps  # phase 1, dedup and after dedup
    # Scores computed up to the drop travel with the reject: a language drop has its language score,
    # a Gopher drop its Gopher scores too, a dedup drop names the copy that stayed.
    by_step = {step: [m for m in rejected if m["rejected"]["step"] == step] for step in steps}
    assert all("lid.score" in m["attributes"] for m in by_step["language"])
    assert all(any(k.startswith("gopher.") for k in m["attributes"]) for m in by_step["gopher_quality"])
    written_ids = {r["id"] for rows in _tree(out, "documents").values() for r in rows}
    assert all(m["rejected"]["duplicate_of"] in written_ids for m in by_step["dedup_exact"])
    assert all(not k.startswith("_") for m in rejected for k in m.get("attributes", {}))


@pytest.mark.integration
def test_a_killed_run_resumes_to_identical_rejects(shared_data: Path, kept: tuple[Path, dict], tmp_path: Path) -> None:
    ref_out, ref = kept
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(_config().to_dict()))  # JSON is YAML
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.cli", "-q", "curate", str(config), "--keep-rejected", "--input",
           *_pages(shared_data, 2), "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((out / "_work" / "stage1").glob("*.done.json")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "stats.json").exists()
    # Resumed without -q: the per-shard lines come through logging.
    done = subprocess.run(cmd[:3] + cmd[4:], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "INFO curation.pipeline: shard 00001-web_pages-00001 written" in done.stderr
    assert "dropped documents kept in" in done.stdout
    assert _tree(out, "rejected") == _tree(ref_out, "rejected")
    assert _tree(out, "documents") == _tree(ref_out, "documents")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rejected_files"] == ref["rejected_files"]


@pytest.mark.integration
def test_resuming_with_another_keep_rejected_is_refused(shared_data: Path, tmp_path: Path) -> None:
    cfg = CurationConfig.from_dict({"steps": [{"extract": {}}, {"language": {"languages": ["en"]}}]})
    page = _pages(shared_data, 1)
    first = curate(cfg, page, tmp_path, progress=False)
    assert "rejected_files" not in first and not (tmp_path / "rejected").exists()
    with pytest.raises(OutputConflictError, match="started without --keep-rejected"):
        curate(cfg, page, tmp_path, progress=False, keep_rejected=True)
    # --overwrite starts over with rejects; then going back without them is refused the same way.
    second = curate(cfg, page, tmp_path, progress=False, keep_rejected=True, overwrite=True)
    assert second["documents_written"] == first["documents_written"]
    assert sum(f["documents"] for f in second["rejected_files"]) == second["documents_read"] - first["documents_written"]
    with pytest.raises(OutputConflictError, match="started with --keep-rejected"):
        curate(cfg, page, tmp_path, progress=False)


@pytest.mark.integration
def test_dolma_rejects_are_json_lines_with_a_nested_rejection(shared_data: Path, tmp_path: Path) -> None:
    cfg = CurationConfig.from_dict({"steps": [{"extract": {}}, {"language": {"languages": ["en"]}}],
                                    "output": {"format": "dolma"}})
    stats = curate(cfg, _pages(shared_data, 1), tmp_path, progress=False, keep_rejected=True)
    [entry] = stats["rejected_files"]
    assert entry["path"] == "rejected/common-crawl/00000-web_pages-00000.jsonl.gz"
    rows = _read(tmp_path / entry["path"])
    assert len(rows) == entry["documents"] == stats["documents_read"] - stats["documents_written"]
    assert Counter(r["metadata"]["rejected"]["reason"] for r in rows) == \
        Counter({**stats["steps"][1]["dropped"], **stats["steps"][2]["dropped"]})


@pytest.mark.integration
def test_ray_keeps_the_same_rejects_as_the_local_executor(
    shared_data: Path, kept: tuple[Path, dict], tmp_path: Path,
) -> None:
    ref_out, _ = kept
    curate(_config(), _pages(shared_data, 2), tmp_path, executor="ray", progress=False, keep_rejected=True)
    assert _tree(tmp_path, "rejected") == _tree(ref_out, "rejected")
    assert _tree(tmp_path, "documents") == _tree(ref_out, "documents")


# ---------------------------------------------------------------------------------------------
# the hook in the step contract


class _Short(Filter):
    name = "short"

    def annotate(self, doc: Document) -> None:
        doc.attributes["short.len"] = len(doc.text)

    def reject(self, doc: Document) -> str | None:
        return "short.too_short" if len(doc.text) < 3 else None


class _Upper(Mapper):
    name = "upper"

    def apply(self, doc: Document) -> Document | str | None:
        if doc.text == "boom":
            raise RuntimeError("boom")
        return None if doc.text == "gone" else doc


def _docs(*texts: str) -> list[Document]:
    return [Document(id=str(i), text=t, source="s") for i, t in enumerate(texts)]


def test_filters_and_mappers_hand_each_drop_to_on_drop() -> None:
    seen: list[tuple[str, str, dict]] = []
    short, upper = _Short(), _Upper()
    for step in (short, upper):
        step.on_drop = lambda doc, reason: seen.append((doc.id, reason, dict(doc.attributes)))
    kept = list(upper(short(_docs("ok!", "no", "gone", "boom", "fine"))))
    assert [d.id for d in kept] == ["0", "4"]
    assert seen == [("1", "short.too_short", {"short.len": 2}), ("2", "upper.empty", {"short.len": 4}),
                    ("3", "upper.error", {"short.len": 4})]
    # Without a hook the same drops are only counted, as before.
    plain = _Short()
    assert [d.id for d in plain(_docs("ok!", "no"))] == ["0"] and plain.stats.dropped == {"short.too_short": 1}


def test_a_step_that_counts_drops_by_hand_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    class HandCounted(Step):
        name = "hand"

        def run(self, docs):  # type: ignore[no-untyped-def]
            for doc in docs:
                if len(doc.text) % 2:
                    self.stats.dropped["hand.odd"] += 1  # bypasses Step.drop: no reject reaches the sink
                else:
                    yield doc

    tables = []
    sink = RejectSink(tables.append, batch_rows=2)
    step, short = HandCounted(), _Short()
    for s in (short, step):
        s.on_drop = sink.hook(s.name)
    list(step(short(_docs("a", "bcd", "efg"))))
    sink.flush()
    assert sum(t.num_rows for t in tables) == sink.rows == 1
    with caplog.at_level(logging.WARNING):
        _check_rejects_complete([short, step], sink)
    assert [r.getMessage()[:40] for r in caplog.records] == ["step hand dropped 2 documents but handed"]


HAND_COUNTED = '''
from curation.step import Step


class HandCounted(Step):
    name = "hand"

    def run(self, docs):
        for doc in docs:
            if len(doc.text) % 2:
                self.stats.dropped["hand.odd"] += 1  # bypasses Step.drop
            else:
                yield doc
'''


@pytest.mark.parametrize("section", ["steps", "after_dedup"])
def test_a_step_that_counts_drops_by_hand_is_reported_in_either_phase(
    section: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "hand_counted_steps.py").write_text(HAND_COUNTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(["ab", "abc", "abcd"])))
    cfg = CurationConfig.from_dict({"reader": "dolma", section: ["hand_counted_steps:HandCounted"]})
    with caplog.at_level(logging.WARNING, logger="curation.pipeline"):
        stats = curate(cfg, [str(path)], tmp_path / "out", progress=False, keep_rejected=True)
    assert stats["documents_written"] == 2 and stats["rejected_files"] == []
    assert [r.getMessage()[:48] for r in caplog.records] == ["step hand dropped 1 documents but handed 0 to St"]
