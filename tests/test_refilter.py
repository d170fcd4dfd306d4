"""`refinery refilter`: new thresholds applied to a corpus's stored scores, checked against fresh
`refinery curate` runs of the same config (real WARCs), plus the rules on a small hand-written WET corpus."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from warcio.warcwriter import WARCWriter

import curation.filters.language as language_module
import curation.refilter as refilter_module
from curation.classify import Classifier
from curation.config import CurationConfig
from curation.corpus import curated_files
from curation.document import Document
from curation.filters.language import LanguageFilter
from curation.pipeline import curate
from curation.refilter import RefilterError, plan_refilter, refilter
from pipelines.cli import main

# The WARC tests' config: web.yaml's steps, keeping German too (the sample pages are mostly German)
# so the Gopher rules have many documents to decide on.
WEB_LIKE: dict[str, Any] = {
    "name": "refilter-test",
    "source": "common-crawl",
    "read": {"statuses": [200]},
    "steps": [
        {"extract": {"extractor": "hybrid", "timeout_s": 5.0}},
        {"language": {"languages": ["en", "de"], "min_score": 0.65}},
        {"line_modifiers": {}},
        {"gopher_repetition": {}},
        {"gopher_quality": {}},
        {"c4": {"filter_no_terminal_punct": False}},
        {"fineweb": {}},
        {"pii": {"max_matches": 5}},
    ],
    "dedup": [
        {"dedup_exact": {}},
        {"dedup_minhash": {"ngram_size": 5, "bands": 26, "rows": 11, "jaccard_threshold": 0.8}},
    ],
    "output": {"format": "parquet"},
}
# Looser: the English stop-word rule off (German pages fail it) and more duplicated characters allowed.
LOOSE = {"gopher_quality": {"min_stop_words": 0, "min_alpha_words_ratio": 0.6},
         "fineweb": {"char_duplicates_ratio": 0.05}}
STRICT = {"gopher_quality": {"min_doc_words": 200}, "fineweb": {"line_punct_thr": 0.3}}


def _config(base: dict[str, Any], path: Path, changes: dict[str, dict[str, Any]] | None = None,
            **top: Any) -> Path:
    cfg = copy.deepcopy(base)
    for step in cfg["steps"]:
        (name, params), = step.items()
        step[name] = {**params, **(changes or {}).get(name, {})}
    cfg.update(top)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _docs(out: Path, key: str = "files") -> dict[str, dict[str, Any]]:
    """id → row (metadata parsed) of every file stats.json lists under `key`."""
    rows = {}
    for entry in json.loads((out / "stats.json").read_text()).get(key, []):
        for r in pq.read_table(out / entry["path"]).to_pylist():
            r["metadata"] = json.loads(r["metadata"])
            rows[r["id"]] = r
    return rows


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def warc_runs(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One sample WARC shard curated with WEB_LIKE and with its looser variant, both keeping rejects."""
    root = tmp_path_factory.mktemp("refilter_warc")
    shard = [str(sorted((shared_data / "warc" / "pages").glob("*.warc.gz"))[0])]
    paths = {"config": _config(WEB_LIKE, root / "web_like.yaml"),
             "loose_config": _config(WEB_LIKE, root / "loose.yaml", LOOSE),
             "strict_config": _config(WEB_LIKE, root / "strict.yaml", STRICT)}
    curate(paths["config"], shard, root / "corpus", progress=False, keep_rejected=True)
    curate(paths["loose_config"], shard, root / "fresh_loose", progress=False, keep_rejected=True)
    return {**paths, "corpus": root / "corpus", "fresh_loose": root / "fresh_loose"}


def test_same_thresholds_keep_exactly_the_corpus(warc_runs: dict[str, Path], tmp_path: Path) -> None:
    before = _tree_digest(warc_runs["corpus"])
    stats = refilter(warc_runs["corpus"], warc_runs["config"], tmp_path / "same", progress=False)
    kept, original = _docs(tmp_path / "same"), _docs(warc_runs["corpus"])
    assert set(kept) == set(original) and len(kept) == stats["documents_written"] > 0
    assert all(kept[i]["text"] == original[i]["text"] for i in kept)
    f = stats["refilter"]
    assert f["from_rejected"] > f["from_kept"] > 0  # the rejects were read and decided again
    assert f["newly_kept"] == f["newly_dropped"] == 0 and not f["missing_scores"]
    # The output is a corpus the later stages read, and CORPUS is untouched.
    assert len(curated_files(tmp_path / "same", (".parquet",)) or []) == len(stats["files"]) > 0
    assert "## Funnel" in (tmp_path / "same" / "report.md").read_text()
    assert _tree_digest(warc_runs["corpus"]) == before


def test_looser_thresholds_keep_what_a_fresh_curate_keeps(warc_runs: dict[str, Path], tmp_path: Path) -> None:
    stats = refilter(warc_runs["corpus"], warc_runs["loose_config"], tmp_path / "loose", progress=False)
    refiltered, fresh, original = _docs(tmp_path / "loose"), _docs(warc_runs["fresh_loose"]), _docs(warc_runs["corpus"])
    assert set(original) < set(refiltered) and stats["refilter"]["newly_kept"] > 100
    # Dedup is not rerun: a fresh run may drop newly kept documents as duplicates; nothing else differs.
    fresh_dedup = {i for i, r in _docs(warc_runs["fresh_loose"], "rejected_files").items()
                   if r["metadata"]["rejected"]["step"].startswith("dedup")}
    assert set(fresh) <= set(refiltered)
    assert set(refiltered) - set(fresh) <= fresh_dedup
    # Documents dropped before c4 and pii got their edits as in a fresh run: same text, same scores.
    for i in fresh:
        assert refiltered[i]["text"] == fresh[i]["text"], i
        assert refiltered[i]["metadata"] == fresh[i]["metadata"], i


def test_stricter_thresholds_keep_a_subset_and_record_why(warc_runs: dict[str, Path], tmp_path: Path) -> None:
    stats = refilter(warc_runs["corpus"], warc_runs["strict_config"], tmp_path / "strict", progress=False,
                     keep_rejected=True)
    kept, original = _docs(tmp_path / "strict"), _docs(warc_runs["corpus"])
    assert set(kept) < set(original)
    dropped = set(original) - set(kept)
    reasons = stats["refilter"]["newly_dropped_by_reason"]
    assert sum(reasons.values()) == len(dropped) and set(reasons) <= {"gopher.gopher_short_doc",
                                                                      "fineweb.line_punct_ratio"}
    rejected = _docs(tmp_path / "strict", "rejected_files")
    assert dropped <= set(rejected)
    # A kept document newly dropped carries text every step rewrote: `resume_at: null` says so.
    assert all(rejected[i]["metadata"]["rejected"]["resume_at"] is None for i in dropped)


def test_refiltering_a_refiltered_corpus_resumes_each_document(warc_runs: dict[str, Path], tmp_path: Path) -> None:
    refilter(warc_runs["corpus"], warc_runs["strict_config"], tmp_path / "a", progress=False, keep_rejected=True)
    refilter(tmp_path / "a", warc_runs["loose_config"], tmp_path / "b", progress=False, keep_rejected=True)
    direct = refilter(warc_runs["corpus"], warc_runs["loose_config"], tmp_path / "c", progress=False)
    chained, once = _docs(tmp_path / "b"), _docs(tmp_path / "c")
    assert direct["documents_written"] == len(chained)
    assert {i: (r["text"], r["metadata"]) for i, r in chained.items()} == \
        {i: (r["text"], r["metadata"]) for i, r in once.items()}


def _no_model(*_: Any, **__: Any) -> Any:
    raise AssertionError("refilter ran a model")


class _LabelsOnly:
    """What the patched loader gives: the model's labels (checked when a config loads), no predictions."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels

    def get_labels(self) -> list[str]:
        return self.labels

    predict = staticmethod(_no_model)


def test_no_model_runs_when_scores_are_stored(warc_runs: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    labels = _LabelsOnly(language_module.load_model(language_module.default_model_path()).get_labels())
    monkeypatch.setattr(language_module, "load_model", lambda path: labels)
    monkeypatch.setattr(LanguageFilter, "predict", _no_model)
    monkeypatch.setattr(Classifier, "predict_proba", _no_model)
    monkeypatch.setattr(refilter_module, "_BUILT", {})
    with pytest.raises(AssertionError, match="ran a model"):  # scoring a page now fails
        LanguageFilter().annotate(Document("probe", "Ein kurzer Satz.", "test"))
    more_languages = _config(WEB_LIKE, tmp_path / "langs.yaml", {**LOOSE, "language": {"languages": ["en", "de", "es", "fr"]}})
    stats = refilter(warc_runs["corpus"], more_languages, tmp_path / "langs", progress=False)
    came_back = stats["refilter"]["newly_kept_by_old_reason"]
    assert came_back.get("language.es", 0) > 0 and came_back.get("language.fr", 0) > 0
    assert not stats["refilter"]["missing_scores"]
    assert {r["metadata"]["lang"] for r in _docs(tmp_path / "langs").values()} >= {"es", "fr"}


# ---------------------------------------------------------------------------------------------
# rules, on a hand-written WET corpus (seconds, no shared data)

SENTENCES = [
    "The committee met on Tuesday to review the budget and the plans for the new library building.",
    "Several members of the public asked whether the opening hours would be extended in the winter.",
    "The architect explained that the design uses natural light and recycled materials wherever possible.",
    "Construction is expected to begin in the spring and to last about eighteen months in total.",
    "A temporary reading room will be opened in the town hall while the old building is closed.",
    "The council has also agreed to fund a programme of evening classes for adults who want to learn.",
    "Local schools will be invited to visit the site and to follow the progress of the work.",
    "Residents who have questions about the project can write to the council or attend the next meeting.",
]
GERMAN = ("Der Ausschuss hat am Dienstag den Haushalt und die Pläne für das neue Gebäude der Bibliothek geprüft. "
          "Mehrere Bürger fragten, ob die Öffnungszeiten im Winter verlängert werden könnten, und die Antwort war "
          "ermutigend. Der Architekt erklärte, dass der Entwurf natürliches Licht und wiederverwendete Materialien "
          "nutzt, wo immer es möglich ist, und dass die Arbeiten im Frühjahr beginnen sollen.")


def _wet_texts() -> dict[str, str]:
    long = {f"http://a.example/{i}": "\n".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(4)}
    return {
        **long,
        "http://a.example/copy": long["http://a.example/0"],  # fetched later: dedup_exact drops it
        "http://a.example/short": "\n".join(SENTENCES[:2]),  # 36 words: gopher_short_doc
        "http://a.example/short2": "\n".join(SENTENCES[2:4]),
        "http://a.example/de": GERMAN,  # no English stop word: gopher_enough_stop_words
        "http://a.example/pii": "\n".join(SENTENCES[3:8]) + "\n" + " ".join(f"Mail x{i}@mail.example.org now."
                                                                             for i in range(7)),
    }


WET_CONFIG: dict[str, Any] = {
    "name": "wet-test",
    "source": "test",
    "steps": [{"gopher_quality": {}}, {"language": {"languages": ["en"]}}, {"fineweb": {}},
              {"pii": {"max_matches": 5}}],
    "dedup": [{"dedup_exact": {}}],
    "output": {"format": "parquet"},
}


@pytest.fixture(scope="module")
def wet_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refilter_wet")
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    for i, (url, text) in enumerate(_wet_texts().items()):
        # Fixed dates and record ids: dedup keeps the earliest copy, and ids break ties.
        headers = {"WARC-Date": f"2024-01-01T00:00:{i:02d}Z", "WARC-Record-ID": f"<urn:uuid:{i:08d}-0000-4000-8000-000000000000>"}
        w.write_record(w.create_warc_record(url, "conversion", payload=io.BytesIO(text.encode()),
                                            warc_content_type="text/plain", warc_headers_dict=headers))
    (root / "pages.wet.gz").write_bytes(buf.getvalue())
    config = _config(WET_CONFIG, root / "wet.yaml")
    curate(config, [str(root / "pages.wet.gz")], root / "corpus", progress=False, keep_rejected=True)
    return {"root": root, "config": config, "corpus": root / "corpus", "input": root / "pages.wet.gz"}


KEPT = {"0", "1", "2", "3"}


def _urls(out: Path, key: str = "files") -> set[str]:
    return {r["metadata"]["url"].rsplit("/", 1)[1] for r in _docs(out, key).values()}


def test_the_wet_fixture_drops_what_the_rules_below_need(wet_corpus: dict[str, Path]) -> None:
    reasons = {r["metadata"]["url"].rsplit("/", 1)[1]: r["metadata"]["rejected"]["reason"]
               for r in _docs(wet_corpus["corpus"], "rejected_files").values()}
    # The copy is fetched later: exact dedup keeps the earliest, page "0".
    assert reasons == {"copy": "dedup.exact", "short": "gopher.gopher_short_doc", "short2": "gopher.gopher_short_doc",
                       "de": "gopher.gopher_enough_stop_words", "pii": "pii.too_many"}
    assert _urls(wet_corpus["corpus"]) == KEPT


def test_a_model_step_a_reject_never_reached_keeps_the_old_decision(
        wet_corpus: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The short pages were dropped by gopher_quality before language ran: loosened gopher lets them
    through, but their language score is not stored and language ID is a model: they stay out, counted."""
    monkeypatch.setattr(LanguageFilter, "predict", _no_model)
    monkeypatch.setattr(refilter_module, "_BUILT", {})
    loose = _config(WET_CONFIG, tmp_path / "loose.yaml", {"gopher_quality": {"min_doc_words": 20}})
    stats = refilter(wet_corpus["corpus"], loose, tmp_path / "out", progress=False, keep_rejected=True)
    assert stats["refilter"]["missing_scores"] == {"refilter.missing_scores.language": 2}
    assert _urls(tmp_path / "out") == KEPT
    rejected = {r["metadata"]["url"].rsplit("/", 1)[1]: r["metadata"]["rejected"]
                for r in _docs(tmp_path / "out", "rejected_files").values()}
    assert rejected["short"] == {"step": "language", "reason": "refilter.missing_scores.language"}
    # Dedup is never rerun: the exact copy stays out with its old record.
    assert rejected["copy"]["step"] == "dedup_exact" and stats["refilter"]["dedup_dropped"] == 1


def test_a_cheap_step_a_reject_never_reached_runs_on_the_stored_text(wet_corpus: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    """pii (a cheap mapper after fineweb) never saw the pages dropped earlier; with language before
    gopher, the short pages keep their stored language score and pass through fineweb and pii for real."""
    moved = {**WET_CONFIG, "steps": [{"language": {"languages": ["en"]}}, {"gopher_quality": {}},
                                     {"fineweb": {}}, {"pii": {"max_matches": 5}}]}
    input_cfg = _config(moved, tmp_path / "moved.yaml")
    curate(input_cfg, [str(wet_corpus["input"])], tmp_path / "corpus", progress=False, keep_rejected=True)
    loose = _config(moved, tmp_path / "loose.yaml", {"gopher_quality": {"min_doc_words": 20}})
    refilter(tmp_path / "corpus", loose, tmp_path / "out", progress=False)
    curate(loose, [str(wet_corpus["input"])], tmp_path / "fresh", progress=False)
    assert _urls(tmp_path / "out") == _urls(tmp_path / "fresh") == KEPT | {"short", "short2"}
    assert {i: r["metadata"] for i, r in _docs(tmp_path / "out").items()} == \
        {i: r["metadata"] for i, r in _docs(tmp_path / "fresh").items()}


def test_a_corpus_without_kept_rejects_can_only_get_stricter(wet_corpus: dict[str, Path], tmp_path: Path) -> None:
    curate(wet_corpus["config"], [str(wet_corpus["input"])], tmp_path / "corpus", progress=False)
    loose = _config(WET_CONFIG, tmp_path / "loose.yaml", {"gopher_quality": {"min_doc_words": 20}})
    stats = refilter(tmp_path / "corpus", loose, tmp_path / "out", progress=False)
    assert _urls(tmp_path / "out") == KEPT and stats["refilter"]["from_rejected"] == 0
    assert "kept no rejects" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("change, message", [
    ({"language": {"model_path": "/elsewhere/lid.176.bin"}}, "`model_path`"),
    ({"pii": {"max_matches": 2}}, "rewrote the stored text"),
    ({"gopher_quality": {"stop_words": ["the", "a"]}}, "`stop_words`"),
])
def test_changes_that_change_what_scores_mean_are_refused(change: dict[str, Any], message: str) -> None:
    old = CurationConfig.from_dict(WET_CONFIG)
    new = copy.deepcopy(WET_CONFIG)
    for step in new["steps"]:
        (name, params), = step.items()
        step[name] = {**params, **change.get(name, {})}
    with pytest.raises(RefilterError, match=message):
        plan_refilter(old, CurationConfig.from_dict(new))


@pytest.mark.parametrize("steps, dedup, message", [
    ([{"gopher_quality": {}}, {"language": {}}, {"fineweb": {}}], [{"dedup_exact": {}}], "`pii` is missing"),
    ([{"language": {}}, {"gopher_quality": {}}, {"fineweb": {}}, {"pii": {"max_matches": 5}}],
     [{"dedup_exact": {}}], "order"),
    ([{"gopher_quality": {}}, {"language": {}}, {"fineweb": {}}, {"pii": {"max_matches": 5}}], [], "dedup"),
    ([{"gopher_quality": {}}, {"language": {}}, {"fineweb": {}}, {"pii": {"max_matches": 5}}, {"line_modifiers": {}}],
     [{"dedup_exact": {}}], "not a filter"),
    ([{"gopher_quality": {}}, {"language": {}}, {"fineweb": {}}, {"pii": {"max_matches": 5}}, {"c4": {}}],
     [{"dedup_exact": {}}], "rewrites kept text"),
])
def test_steps_refilter_cannot_answer_from_stored_scores_are_refused(steps: list, dedup: list, message: str) -> None:
    old = CurationConfig.from_dict(WET_CONFIG)
    with pytest.raises(RefilterError, match=message):
        plan_refilter(old, CurationConfig.from_dict({**WET_CONFIG, "steps": steps, "dedup": dedup}))


def test_a_new_model_step_is_refused_and_filters_may_go_or_come() -> None:
    old = CurationConfig.from_dict(WET_CONFIG)
    new = {**WET_CONFIG, "steps": [*WET_CONFIG["steps"], {"classify": {"quality_model": "/m"}}]}
    with pytest.raises(RefilterError, match="runs a model"):
        plan_refilter(old, CurationConfig.from_dict(new))
    fewer = {**WET_CONFIG, "steps": [{"gopher_quality": {}}, {"pii": {"max_matches": 5}}, {"gopher_repetition": {}}]}
    plan = plan_refilter(old, CurationConfig.from_dict(fewer))
    assert [(p.name, p.old_index) for p in plan.steps if p.kind != "dedup"] == \
        [("gopher_quality", 0), ("pii", 3), ("gopher_repetition", None)]


def _cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["-q", "refilter", *args])
    return code, capsys.readouterr().err.strip()


def test_bad_input_is_one_line_and_exit_2(wet_corpus: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    corpus, config = str(wet_corpus["corpus"]), str(wet_corpus["config"])
    before = _tree_digest(wet_corpus["corpus"])
    (tmp_path / "plain").mkdir()
    code, err = _cli(str(tmp_path / "plain"), config, "-o", str(tmp_path / "o1"), capsys=capsys)
    assert code == 2 and "is not a curation output" in err and "\n" not in err
    unfinished = tmp_path / "unfinished"
    (unfinished / "_work").mkdir(parents=True)
    (unfinished / "_work" / "run.json").write_text("{}")
    code, err = _cli(str(unfinished), config, "-o", str(tmp_path / "o2"), capsys=capsys)
    assert code == 2 and "has not finished" in err
    typo = _config({**WET_CONFIG, "steps": [{"gopher_qualty": {}}]}, tmp_path / "typo.yaml")
    code, err = _cli(corpus, str(typo), "-o", str(tmp_path / "o3"), capsys=capsys)
    assert code == 2 and "unknown step 'gopher_qualty'" in err and "gopher_quality" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, err = _cli(corpus, config, "-o", str(busy), capsys=capsys)
    assert code == 2 and "is not empty" in err
    code, err = _cli(corpus, config, "-o", str(busy), "--overwrite", capsys=capsys)
    assert code == 2 and "only replaces a corpus" in err and (busy / "notes.txt").read_text() == "mine"
    code, err = _cli(corpus, config, "-o", str(wet_corpus["corpus"] / "documents" / "new"), capsys=capsys)
    assert code == 2 and "overlaps the corpus" in err
    assert _tree_digest(wet_corpus["corpus"]) == before


def test_overwrite_replaces_an_earlier_refilter_whole(wet_corpus: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _ = _cli(str(wet_corpus["corpus"]), str(wet_corpus["config"]), "-o", str(out), "--keep-rejected",
                   capsys=capsys)
    assert code == 0 and (out / "rejected").is_dir()
    code, _ = _cli(str(wet_corpus["corpus"]), str(wet_corpus["config"]), "-o", str(out), "--overwrite",
                   capsys=capsys)
    assert code == 0 and not (out / "rejected").exists() and _urls(out) == KEPT
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


@pytest.mark.slow
def test_ray_executor_writes_what_the_local_one_writes(wet_corpus: dict[str, Path], tmp_path: Path) -> None:
    loose = _config(WET_CONFIG, tmp_path / "loose.yaml", {"gopher_quality": {"min_doc_words": 20}})
    local = refilter(wet_corpus["corpus"], loose, tmp_path / "local", progress=False, keep_rejected=True)
    ray = refilter(wet_corpus["corpus"], loose, tmp_path / "ray", executor="ray", progress=False, keep_rejected=True)
    assert ray["refilter"] == local["refilter"]
    for key in ("files", "rejected_files"):
        assert _docs(tmp_path / "ray", key) == _docs(tmp_path / "local", key)


def test_leftovers_of_a_refilter_killed_while_publishing_are_removed(wet_corpus: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    """A kill between `_publish`'s two renames leaves the replaced output as `.old-<pid>-NAME`
    (and the finished one as `.tmp-<pid>-NAME`); the next run into NAME removes both, and leaves
    a live process's and another output's alone."""
    child = subprocess.Popen(["true"])
    child.wait()
    dead = child.pid  # exited and reaped: no process holds this pid now
    left = [tmp_path / f".old-{dead}-out", tmp_path / f".tmp-{dead}-out"]
    kept = [tmp_path / f".old-{dead}-other", tmp_path / f".old-{os.getppid()}-out"]
    for d in left + kept:
        (d / "documents").mkdir(parents=True)
        (d / "stats.json").write_text("{}")
    refilter(wet_corpus["corpus"], wet_corpus["config"], tmp_path / "out", progress=False)
    assert _urls(tmp_path / "out") == KEPT
    assert not any(d.exists() for d in left) and all(d.is_dir() for d in kept)
