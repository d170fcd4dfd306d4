"""The output-directory contract: a curation output is read as its written documents only, it
belongs to one run at a time, a run touches only what it writes, and stale results never stay.

Real archives from ../shared/data, copied into tmp_path where a test needs to rename or change one.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import CurationConfig
from curation.corpus import CorpusError
from curation.pipeline import OutputConflictError, curate
from curation.tokenize import tokenize_corpus
from curation.tokenizer import input_files, train_tokenizer
from pipelines.cli import main
from training.data import TokenShards

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "pipelines" / "configs" / "web.yaml"
pytestmark = pytest.mark.integration
EXTRACT_ONLY = {"steps": [{"extract": {}}]}
WITH_DEDUP = {"steps": [{"extract": {}}], "dedup": [{"dedup_exact": {}}, {"dedup_minhash": {}}]}


def _cfg(raw: dict) -> CurationConfig:
    return CurationConfig.from_dict(raw)


def _ids(out: Path) -> list[str]:
    """Ids of every document file under out/documents, whatever the run recorded."""
    return [i for f in sorted((out / "documents").rglob("*.parquet")) for i in pq.read_table(f)["id"].to_pylist()]


@pytest.fixture(scope="module")
def wget_warcs(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "warc" / "other").glob("dolma_wget_sample-000*.warc.gz"))


@pytest.fixture(scope="module")
def readme_chain(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The README's three commands in order, on one shard of the sample pages."""
    root = tmp_path_factory.mktemp("readme")
    corpus, tok, tokens = root / "corpus", root / "tok.json", root / "tokens"
    page = str(shared_data / "warc" / "pages" / "web_pages-00000.warc.gz")
    rcs = [
        main(["-q", "curate", str(WEB), "--input", page, "--output", str(corpus)]),
        main(["-q", "tokenizer", "train", "--input", str(corpus), "--vocab-size", "512", "--output", str(tok)]),
        main(["-q", "tokenize", "--corpus", str(corpus), "--tokenizer", str(tok), "--output", str(tokens)]),
    ]
    return {"rcs": rcs, "corpus": corpus, "tok": tok, "tokens": tokens,
            "stats": json.loads((corpus / "stats.json").read_text())}


# ---------------------------------------------------------------------------------------------
# 1. the corpus a user points at reads as the corpus


def test_readme_commands_produce_tokens_of_the_written_documents_only(readme_chain: dict) -> None:
    assert readme_chain["rcs"] == [0, 0, 0]
    stats, tokens = readme_chain["stats"], readme_chain["tokens"]
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert manifest["complete"] and not manifest["failed"]
    assert manifest["total_documents"] == stats["documents_written"] > 0
    assert [s["input"] for s in manifest["shards"]] == [f["path"] for f in stats["files"]]
    assert not any("_work" in s["path"] or "_work" in s["input"] for s in manifest["shards"])
    assert len(TokenShards(tokens)) == manifest["total_tokens"]


def test_the_corpus_reads_the_same_at_every_level_it_is_named(readme_chain: dict, tmp_path: Path) -> None:
    corpus, stats = readme_chain["corpus"], readme_chain["stats"]
    written = [corpus / f["path"] for f in stats["files"]]
    assert input_files([corpus]) == written
    for level in (corpus / "documents", corpus / "documents" / "common-crawl"):
        assert [p.resolve() for p in input_files([level])] == [p.resolve() for p in written]
        result = tokenize_corpus(level, readme_chain["tok"], tmp_path / level.name)
        assert result["total_documents"] == stats["documents_written"]


def test_the_work_folder_and_an_unfinished_run_are_not_read_as_a_corpus(
    readme_chain: dict, tmp_path: Path
) -> None:
    with pytest.raises(CorpusError, match="work folder"):
        tokenize_corpus(readme_chain["corpus"] / "_work" / "stage1", readme_chain["tok"], tmp_path / "t1")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(readme_chain["corpus"], unfinished)
    (unfinished / "stats.json").unlink()  # as a run killed before its end leaves it
    with pytest.raises(CorpusError, match="has not finished"):
        tokenize_corpus(unfinished, readme_chain["tok"], tmp_path / "t2")
    with pytest.raises(CorpusError, match="has not finished"):
        input_files([unfinished / "documents"])


def test_a_failed_tokenize_leaves_a_manifest_the_trainer_refuses(tmp_path: Path) -> None:
    corpus = tmp_path / "plain"
    corpus.mkdir()
    pq.write_table(pa.table({"text": ["a first document", "a second one"]}), corpus / "good.parquet")
    tok = train_tokenizer([corpus], 300, tmp_path / "tok" / "tokenizer.json")
    (corpus / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    result = tokenize_corpus(corpus, tok, tmp_path / "tokens")
    assert [f["input"] for f in result["failed"]] == ["broken.parquet"]
    manifest = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    assert manifest["complete"] is False
    with pytest.raises(ValueError, match="did not finish: 1 input files failed"):
        TokenShards(tmp_path / "tokens")


# ---------------------------------------------------------------------------------------------
# 2. rows, not ids: the same archive under two names


def test_the_same_archive_under_two_names_is_written_once(wget_warcs: list[Path], tmp_path: Path) -> None:
    a, b = tmp_path / "in" / "a.warc.gz", tmp_path / "in" / "b.warc.gz"
    a.parent.mkdir()
    shutil.copyfile(wget_warcs[0], a)
    shutil.copyfile(wget_warcs[0], b)
    single = curate(_cfg(WITH_DEDUP), [str(a)], tmp_path / "single", progress=False)
    double = curate(_cfg(WITH_DEDUP), [str(a), str(b)], tmp_path / "double", progress=False)
    assert single["documents_written"] > 0
    assert double["documents_read"] == 2 * single["documents_read"]
    assert double["documents_written"] == single["documents_written"]
    assert sorted(_ids(tmp_path / "double")) == sorted(_ids(tmp_path / "single"))
    # every survivor is the copy in the first shard (ties on date and id go to the row key)
    assert [f["path"] for f in double["files"]] == ["documents/common-crawl/00000-a.parquet"]


# ---------------------------------------------------------------------------------------------
# 3. one run per output


def test_a_second_run_on_a_held_output_fails_at_once_naming_the_holder(
    wget_warcs: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from curation.pipeline import "
         "hold_output\nwith hold_output(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)",
         str(out)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputConflictError, match=f"in use by another refinery curate run \\(pid {holder.pid}\\)"):
            curate(_cfg(EXTRACT_ONLY), [str(wget_warcs[0])], out, progress=False)
        assert not (out / "documents").exists() and not (out / "_work" / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone the output is free again
    assert curate(_cfg(EXTRACT_ONLY), [str(wget_warcs[0])], out, progress=False)["documents_written"] > 0


def test_other_inputs_are_refused_and_overwrite_replaces_only_what_a_run_writes(
    wget_warcs: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "project"
    (out / "sub").mkdir(parents=True)
    mine = [out / "notes.txt", out / "sub" / ".tmp-draft.txt", out / ".tmp-1-plan.json"]
    for p in mine:
        p.write_text("the user's")
    first = curate(_cfg(EXTRACT_ONLY), [str(wget_warcs[0])], out, progress=False)
    with pytest.raises(OutputConflictError, match="different config or inputs.*--overwrite"):
        curate(_cfg(EXTRACT_ONLY), [str(wget_warcs[1])], out, progress=False)
    with pytest.raises(OutputConflictError, match="different config"):
        curate(_cfg({**EXTRACT_ONLY, "output": {"format": "dolma"}}), [str(wget_warcs[0])], out, progress=False)
    assert json.loads((out / "stats.json").read_text())["files"] == first["files"]  # refusals change nothing
    second = curate(_cfg(EXTRACT_ONLY), [str(wget_warcs[1])], out, progress=False, overwrite=True)
    assert [f["path"] for f in second["files"]] == ["documents/common-crawl/00000-dolma_wget_sample-0001.parquet"]
    assert [p.relative_to(out).as_posix() for p in (out / "documents").rglob("*") if p.is_file()] == [
        second["files"][0]["path"]]
    assert all(p.read_text() == "the user's" for p in mine)


def test_cli_overwrite_flag_reaches_the_run(wget_warcs: list[Path], tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(json.dumps(EXTRACT_ONLY))  # JSON is YAML
    assert main(["-q", "curate", str(cfg), "--input", str(wget_warcs[0]), "--output", out]) == 0
    assert main(["-q", "curate", str(cfg), "--input", str(wget_warcs[1]), "--output", out]) == 2
    assert main(["-q", "curate", str(cfg), "--input", str(wget_warcs[1]), "--output", out, "--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------
# 4. cleanup touches only what the run wrote


def test_cleanup_removes_only_the_runs_own_temp_files(wget_warcs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "project"
    curate(_cfg(EXTRACT_ONLY), [str(wget_warcs[0])], out, progress=False)
    theirs = [out / "sub" / ".tmp-draft.txt", out / "sub" / ".tmp-42-x.parquet", out / ".tmp-essay"]
    ours = [out / "documents" / "common-crawl" / ".tmp-99-00000-x.parquet", out / "_work" / "stage1" /
            ".tmp-99-00000-x.parquet", out / ".tmp-99-stats.json"]
    for p in theirs + ours:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    curate(_cfg(EXTRACT_ONLY), [str(wget_warcs[0])], out, progress=False)
    assert all(p.exists() for p in theirs)
    assert not any(p.exists() for p in ours)


# ---------------------------------------------------------------------------------------------
# 5. no stale results


def test_results_without_a_run_record_are_refused_not_mixed(wget_warcs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    curate(_cfg(EXTRACT_ONLY), [str(wget_warcs[0])], out, progress=False)
    shutil.rmtree(out / "_work")
    with pytest.raises(OutputConflictError, match="no run record accounts for.*documents"):
        curate(_cfg(EXTRACT_ONLY), [str(wget_warcs[1])], out, progress=False)
    again = curate(_cfg(EXTRACT_ONLY), [str(wget_warcs[1])], out, progress=False, overwrite=True)
    assert sorted(_ids(out)) == sorted(pq.read_table(out / again["files"][0]["path"])["id"].to_pylist())
    assert len(again["files"]) == 1


def test_an_input_changed_at_the_same_path_is_redone(wget_warcs: list[Path], tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    page, other = inp / "page.warc.gz", inp / "other.warc.gz"
    shutil.copyfile(wget_warcs[0], page)
    shutil.copyfile(wget_warcs[1], other)
    out = tmp_path / "out"
    cfg = _cfg(WITH_DEDUP)
    curate(cfg, [str(page), str(other)], out, progress=False)
    # new content at both paths: `page` now holds the other sample, `other` holds no record at all
    shutil.copyfile(wget_warcs[1], page)
    with gzip.open(other, "wb"):
        pass
    os.utime(other, ns=(1, 1))
    redone = curate(cfg, [str(page), str(other)], out, progress=False)
    fresh = curate(cfg, [str(page), str(other)], tmp_path / "fresh", progress=False)
    assert redone["documents_written"] == fresh["documents_written"] > 0
    assert redone["files"] == fresh["files"] == [
        {"path": "documents/common-crawl/00000-page.parquet", "documents": fresh["documents_written"]}]
    assert _ids(out) == _ids(tmp_path / "fresh")  # the emptied input's old shard is gone too
