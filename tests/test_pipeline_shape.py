"""The shape of a curation run: steps after dedup see only its survivors, the corpus is partitioned
by attributes (language, quality bucket), and each finished shard logs one line."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curation.pipeline as pipeline
from curation.config import CurationConfig
from curation.corpus import curated_files
from curation.partition import PartitionedWriter, Partitioner, PartitionError, bucket_name
from curation.pipeline import curate, remove_stale_files
from curation.registry import ConfigError
from curation.writer import BASE_SCHEMA, read_documents

EDGES = [0.2, 0.5, 0.8]


def _pages(shared_data: Path, n: int) -> list[str]:
    return sorted(str(p) for p in (shared_data / "warc" / "pages").glob("*.warc.gz"))[:n]


def _config(quality_model: Path) -> CurationConfig:
    return CurationConfig.from_dict({
        "name": "shaped",
        "steps": [{"extract": {}}, {"language": {"languages": ["en", "de", "fr", "es"]}}, {"gopher_repetition": {}}],
        "dedup": [{"dedup_exact": {}}, {"dedup_minhash": {}}],
        "after_dedup": [{"classify": {"quality_model": str(quality_model)}}, {"gopher_quality": {}}],
        "output": {"partition_by": ["lang", "quality.score"], "buckets": {"quality.score": EDGES}},
    })


def _rows(out: Path) -> dict[str, list[dict]]:
    """Rows of every document file under out/documents, by path relative to out."""
    return {f.relative_to(out).as_posix(): pq.read_table(f).to_pylist()
            for f in sorted((out / "documents").rglob("*.parquet"))}


@pytest.fixture(scope="module")
def quality_model(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from curation.classify_train import default_sources, train_classifier

    out = tmp_path_factory.mktemp("quality")
    train_classifier("quality", default_sources("quality", shared_data), out, max_per_source=200, threads=1,
                     holdout=0.2)
    return out


@pytest.fixture(scope="module")
def shaped_run(shared_data: Path, quality_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shaped")
    return out, curate(_config(quality_model), _pages(shared_data, 2), out, progress=False)


# ---------------------------------------------------------------------------------------------
# steps after dedup


@pytest.mark.integration
def test_after_dedup_steps_see_only_the_survivors_of_dedup(shaped_run: tuple[Path, dict]) -> None:
    out, stats = shaped_run
    steps = {s["name"]: s for s in stats["steps"]}
    assert [s["name"] for s in stats["steps"]] == ["read", "extract", "language", "gopher_repetition",
                                                    "dedup_exact", "dedup_minhash", "classify", "gopher_quality"]
    for prev, cur in zip(stats["steps"], stats["steps"][1:], strict=False):
        assert cur["docs_in"] == prev["docs_out"], (prev["name"], cur["name"])
        assert cur["docs_in"] - cur["docs_out"] == sum(cur["dropped"].values()), cur["name"]
    phase1_rows = sum(s["rows_after_filters"] for s in stats["shards"])
    deduped = phase1_rows - steps["dedup_minhash"]["docs_out"]
    assert deduped > 0  # the sample pages hold duplicates, so "only survivors" is a real restriction
    assert steps["classify"]["docs_in"] == phase1_rows - deduped
    assert stats["documents_written"] == steps["gopher_quality"]["docs_out"] > 0
    # Phase 1 never ran the tagger; every written document carries its score.
    stage1 = [json.loads(m) for f in (out / "_work" / "stage1").glob("*.parquet")
              for m in pq.read_table(f, columns=["metadata"])["metadata"].to_pylist()]
    assert len(stage1) == phase1_rows and not any("quality.score" in m.get("attributes", {}) for m in stage1)
    written = [json.loads(r["metadata"]) for rows in _rows(out).values() for r in rows]
    assert len(written) == stats["documents_written"]
    assert all(0.0 <= m["attributes"]["quality.score"] <= 1.0 for m in written)
    assert "| classify |" in (out / "report.md").read_text()


@pytest.mark.integration
def test_a_write_phase_killed_midway_resumes_to_the_same_corpus(
    shared_data: Path, quality_model: Path, shaped_run: tuple[Path, dict], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref_out, ref = shaped_run
    real_close = PartitionedWriter.close

    def dies_on_the_second_shard(self: PartitionedWriter) -> dict[str, int]:
        if self.name.startswith("00001-"):
            raise KeyboardInterrupt  # as a kill would, after shard 0 was written
        return real_close(self)

    monkeypatch.setattr(PartitionedWriter, "close", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        curate(_config(quality_model), _pages(shared_data, 2), tmp_path, progress=False)
    monkeypatch.undo()
    first = tmp_path / "_work" / "final" / "00000-web_pages-00000.done.json"
    made = first.stat().st_mtime_ns
    assert not (tmp_path / "stats.json").exists()
    assert not list((tmp_path / "documents").rglob("00001-*"))  # nothing half-written is visible

    stats = curate(_config(quality_model), _pages(shared_data, 2), tmp_path, progress=False)
    assert first.stat().st_mtime_ns == made  # the finished shard was not written again
    assert [(s["name"], s["docs_in"], s["docs_out"], s["dropped"]) for s in stats["steps"]] == \
        [(s["name"], s["docs_in"], s["docs_out"], s["dropped"]) for s in ref["steps"]]
    assert stats["files"] == ref["files"]
    strip = {p: [{k: v for k, v in r.items() if k != "added"} for r in rows] for p, rows in _rows(ref_out).items()}
    assert {p: [{k: v for k, v in r.items() if k != "added"} for r in rows]
            for p, rows in _rows(tmp_path).items()} == strip


@pytest.mark.integration
def test_without_dedup_after_dedup_steps_run_after_the_steps(shared_data: Path, tmp_path: Path) -> None:
    cfg = CurationConfig.from_dict({"steps": [{"extract": {}}], "after_dedup": [{"language": {"languages": ["en"]}}]})
    stats = curate(cfg, _pages(shared_data, 1), tmp_path, progress=False)
    names = [s["name"] for s in stats["steps"]]
    assert names == ["read", "extract", "language"]
    assert stats["steps"][2]["docs_in"] == stats["steps"][1]["docs_out"] > stats["steps"][2]["docs_out"]
    assert stats["documents_written"] == stats["steps"][2]["docs_out"] == stats["languages"]["en"]


def test_after_dedup_is_part_of_the_config_and_its_fingerprint() -> None:
    base = {"steps": [{"extract": {}}], "dedup": [{"dedup_exact": {}}]}
    plain = CurationConfig.from_dict(base)
    tagged = CurationConfig.from_dict({**base, "after_dedup": [{"gopher_quality": {"min_doc_words": 10}}]})
    assert [s.name for s in tagged.after_dedup] == ["gopher_quality"]
    assert tagged.fingerprint() != plain.fingerprint()
    assert "after_dedup" not in plain.to_dict()  # configs without it keep their fingerprint
    assert CurationConfig.from_dict(tagged.to_dict()).fingerprint() == tagged.fingerprint()
    with pytest.raises(ConfigError, match="after_dedup.*unknown step 'gopher_qualty'"):
        CurationConfig.from_dict({**base, "after_dedup": [{"gopher_qualty": {}}]})
    with pytest.raises(ConfigError, match="dedup_exact"):  # dedup steps are not per-document steps
        CurationConfig.from_dict({**base, "after_dedup": [{"dedup_exact": {}}]})


# ---------------------------------------------------------------------------------------------
# partitioned output


@pytest.mark.integration
def test_partitions_by_language_and_quality_bucket_hold_exactly_their_documents(
    shaped_run: tuple[Path, dict],
) -> None:
    out, stats = shaped_run
    rows = _rows(out)
    assert sorted(rows) == [f["path"] for f in stats["files"]]  # stats lists every file, nothing else
    pattern = re.compile(r"documents/lang=(\w+)/quality\.score=q([0-3])/\d{5}-web_pages-\d{5}\.parquet")
    langs: Counter = Counter()
    for path, file_rows in rows.items():
        m = pattern.fullmatch(path)
        assert m, path
        assert len(file_rows) == next(f["documents"] for f in stats["files"] if f["path"] == path)
        for r in file_rows:
            meta = json.loads(r["metadata"])
            assert meta["lang"] == m[1]
            assert bucket_name(meta["attributes"]["quality.score"], EDGES) == f"q{m[2]}"
        langs[m[1]] += len(file_rows)
    assert sum(len(v) for v in rows.values()) == stats["documents_written"]
    assert dict(langs) == stats["languages"] and len(langs) >= 2
    assert len({pattern.fullmatch(p)[2] for p in rows}) >= 2  # more than one quality bucket was written
    # Readers take a corpus at any of its levels, a partition folder included.
    en = curated_files(out / "documents" / "lang=en", (".parquet",))
    assert en and all("lang=en/" in f.as_posix() for f in en)
    assert sum(1 for f in en for _ in read_documents(f)) == langs["en"]
    assert len(curated_files(out, (".parquet",))) == len(rows)
    assert "`documents/lang=en/quality.score=q0/`" in (out / "report.md").read_text()


def test_bucket_names_cut_at_the_edges() -> None:
    assert [bucket_name(v, EDGES) for v in (0.0, 0.19, 0.2, 0.5, 0.79, 0.8, 1.0)] == \
        ["q0", "q0", "q1", "q2", "q2", "q3", "q3"]


def test_partition_folders_are_hive_style_path_safe_and_unknown_when_missing() -> None:
    part = Partitioner(["source", "lang", "topic.label", "quality.score"], {"quality.score": EDGES})
    meta = {"lang": "de", "attributes": {"topic.label": "sci/tech", "quality.score": 0.55}}
    assert part.folder("common crawl", meta) == "source=common_crawl/lang=de/topic.label=sci_tech/quality.score=q2"
    assert part.folder("", {}) == "source=unknown/lang=unknown/topic.label=unknown/quality.score=unknown"
    assert Partitioner(["lang"]).folder("x", {"lang": ".."}) == "lang=__"
    assert Partitioner().folder("common-crawl", meta) == "common-crawl"  # the default: today's layout
    with pytest.raises(PartitionError, match="output.buckets.gopher.word_count"):
        Partitioner(["gopher.word_count"]).folder("x", {"attributes": {"gopher.word_count": 12.5}})
    with pytest.raises(PartitionError, match="not a label"):
        Partitioner(["topic.probs"]).folder("x", {"attributes": {"topic.probs": {"a": 1.0}}})


@pytest.mark.parametrize(("output", "message"), [
    ({"partition_by": ["quality.score"]}, "give its bucket edges"),
    ({"partition_by": ["lang"], "buckets": {"quality.score": [0.5]}}, "not in partition_by"),
    ({"partition_by": ["quality.score"], "buckets": {"quality.score": [0.5, 0.2]}}, "strictly increasing"),
    ({"partition_by": "lang"}, "must be a list"),
    ({"partition_by": ["lang", "lang"]}, "twice"),
    ({"buckets": {"quality.score": [0.5]}}, "need partition_by"),
    ({"partition_by": ["lang"], "buckets": {"lang": [1]}}, "cannot be bucketed"),
])
def test_bad_partitioning_is_refused_when_the_config_loads(output: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CurationConfig.from_dict({"steps": [{"extract": {}}], "output": output})


def test_the_partitioned_writer_writes_dolma_files_atomically(tmp_path: Path) -> None:
    rows = [{"id": str(i), "text": f"t{i}", "source": "s", "added": "", "created": "",
             "metadata": json.dumps({"lang": "de" if i % 2 else "en"})} for i in range(5)]
    table = pa.Table.from_pylist(rows, schema=BASE_SCHEMA)
    writer = PartitionedWriter(tmp_path / "documents", "00000-x", "dolma", batch_rows=2)
    writer.write([f"lang={json.loads(r['metadata'])['lang']}" for r in rows], table)
    assert all(p.name.startswith(".tmp-") for p in (tmp_path / "documents").rglob("*.jsonl.gz"))  # until close
    files = writer.close()
    assert files == {"documents/lang=de/00000-x.jsonl.gz": 2, "documents/lang=en/00000-x.jsonl.gz": 3}
    docs = list(read_documents(tmp_path / "documents/lang=en/00000-x.jsonl.gz"))
    assert [d.id for d in docs] == ["0", "2", "4"] and docs[0].metadata == {"lang": "en"}
    assert not list(tmp_path.rglob(".tmp-*"))


def test_stale_files_in_nested_partitions_are_removed_and_user_files_stay(tmp_path: Path) -> None:
    docs = tmp_path / "documents"
    keep = docs / "lang=en/quality.score=q1/00000-a.parquet"
    stale = docs / "lang=de/quality.score=q0/00001-b.parquet"
    mine = docs / "lang=fr/notes.txt"
    for p in (keep, stale, mine):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    removed = remove_stale_files(docs, {"documents/lang=en/quality.score=q1/00000-a.parquet"})
    assert removed == [stale]
    assert keep.is_file() and mine.is_file() and not (docs / "lang=de").exists()  # emptied folders go too


# ---------------------------------------------------------------------------------------------
# logging


@pytest.mark.integration
def test_each_finished_shard_logs_a_line_and_read_errors_warn(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    bad = str(shared_data / "warc" / "malformed" / "resiliparse_clipped.warc.gz")
    cfg = CurationConfig.from_dict({"steps": [{"extract": {}}]})
    with caplog.at_level(logging.INFO, logger=pipeline.__name__):
        stats = curate(cfg, [bad, *_pages(shared_data, 1)], tmp_path, progress=False)
    lines = [r for r in caplog.records if r.name == pipeline.__name__]
    read = [r.getMessage() for r in lines if r.levelno == logging.INFO and "documents read" in r.getMessage()]
    assert len(read) == 2 and all(re.search(r"\d+ documents read, \d+ kept after the steps, [\d.]+ s", m) for m in read)
    written = [r.getMessage() for r in lines if r.levelno == logging.INFO and " written: " in r.getMessage()]
    assert len(written) == sum(1 for s in stats["shards"] if s["rows_after_filters"]) == 1  # the clipped one has none
    warnings = [r.getMessage() for r in lines if r.levelno == logging.WARNING]
    assert stats["steps"][0]["errors"] and len(warnings) == 1
    assert "00000-resiliparse_clipped" in warnings[0] and "read errors" in warnings[0]
