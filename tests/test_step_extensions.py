"""The step API's extensions: a batch hook for model-based taggers, third-party steps named
`package.module:ClassName` in the YAML, and per-step resources that the Ray executor honours."""

from __future__ import annotations

import gzip
import json
import random
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from curation.config import CurationConfig, validate_buildable
from curation.document import Document
from curation.executor import InsufficientResourcesError, LocalExecutor, RayExecutor, ray_task_options
from curation.filters.language import LanguageFilter
from curation.pipeline import curate
from curation.registry import DEDUP_STEPS, DOC_STEPS, ConfigError, build, phase_resources
from curation.step import Filter

EN = "The committee met on Tuesday to discuss the new budget for the public library and its opening hours."
DE = "Der Ausschuss hat sich am Dienstag getroffen, um den neuen Haushalt der Stadtbibliothek zu besprechen."
FR = "Le comité s'est réuni mardi pour discuter du nouveau budget de la bibliothèque municipale."


def _docs(n: int) -> list[Document]:
    return [Document(id=str(i), text="x" * i, source="t") for i in range(n)]


# --- the batch hook ------------------------------------------------------------------------------


class BatchLength(Filter):
    """Scores lengths a batch at a time and remembers the batch sizes it was given."""

    name = "blen"

    def __init__(self, batch_size: int = 3, bad_id: str | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.bad_id = bad_id
        self.batches: list[int] = []
        self.singles = 0

    def annotate_batch(self, docs: list[Document]) -> None:
        self.batches.append(len(docs))
        if any(d.id == self.bad_id for d in docs):
            raise RuntimeError("the model choked on one document")
        for d in docs:
            d.attributes["blen.len"] = len(d.text)

    def annotate(self, doc: Document) -> None:
        self.singles += 1
        if doc.id == self.bad_id:
            raise RuntimeError("bad document")
        doc.attributes["blen.len"] = len(doc.text)

    def reject(self, doc: Document) -> str | None:
        return "blen.short" if doc.attributes["blen.len"] < 2 else None


def test_a_batching_filter_is_called_once_per_batch_then_decides_per_document() -> None:
    f = BatchLength(batch_size=3)
    kept = list(f(_docs(7)))
    assert f.batches == [3, 3, 1] and f.singles == 0
    assert [d.id for d in kept] == ["2", "3", "4", "5", "6"]
    assert f.stats.docs_in == 7 and f.stats.docs_out == 5 and f.stats.dropped == {"blen.short": 2}


def test_a_failed_batch_falls_back_to_one_by_one_so_one_bad_document_is_one_counted_drop() -> None:
    f = BatchLength(batch_size=4, bad_id="5")
    kept = list(f(_docs(8)))
    assert [d.id for d in kept] == ["2", "3", "4", "6", "7"]
    assert f.singles == 4  # only the failed batch was scored again
    assert f.stats.dropped == {"blen.short": 2, "blen.error": 1}
    assert f.stats.errors == {"blen.exception": 1} and f.stats.samples[0]["id"] == "5"
    assert f.stats.counters == {"blen.batch_retried": 1}


def test_batches_are_pulled_lazily_not_the_whole_stream() -> None:
    pulled = []

    def stream() -> Iterator[Document]:
        for d in _docs(100):
            pulled.append(d.id)
            yield d

    first = next(iter(BatchLength(batch_size=10)(stream())))
    assert first.id == "2" and len(pulled) == 10


class PerDocumentLanguage(LanguageFilter):
    """The language filter as it was before the batch hook: one fastText call per document."""

    annotate_batch = Filter.annotate_batch


def _language_docs() -> list[Document]:
    texts = [EN, DE, FR, "", "1234 5678", EN + "\n" + DE, "ok", None, DE * 3, "日本語のテキストです。"]
    return [Document(id=str(i), text=t, source="t") for i, t in enumerate(texts)]  # type: ignore[arg-type]


def _outcome(f: Filter, docs: list[Document]) -> tuple[list[tuple[str, dict, dict]], dict, dict]:
    kept = list(f(docs))
    return [(d.id, d.attributes, d.metadata) for d in kept], dict(f.stats.dropped), dict(f.stats.errors)


def test_language_filter_batched_equals_one_call_per_document() -> None:
    batched, single = LanguageFilter(languages=["en", "de"], batch_size=4), PerDocumentLanguage(languages=["en", "de"])
    got = _outcome(batched, _language_docs())
    assert got == _outcome(single, _language_docs())
    assert [i for i, _, _ in got[0]] == ["0", "1", "5", "8"] and got[2] == {"language.bad_text": 1}
    assert batched.stats.counters == {}  # no batch failed


@pytest.mark.integration
def test_language_filter_batched_equals_one_call_per_document_on_real_documents(shared_data: Path) -> None:
    with gzip.open(shared_data / "web_text/dolma_cc_fixtures/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz") as f:
        rows = [orjson.loads(line) for line in f]

    def docs() -> list[Document]:
        return [Document(id=r["id"], text=r["text"], source="t") for r in rows]

    batched = _outcome(LanguageFilter(languages=["en", "es"]), docs())
    assert batched == _outcome(PerDocumentLanguage(languages=["en", "es"]), docs())
    assert len(batched[0]) > 250 and len(batched[1]) > 5


def _quality_model(root: Path) -> Path:
    from curation.classify_train import Source, train_classifier

    rng = random.Random(0)
    good = "the study found that students who read every day improved their writing and reasoning".split()
    bad = "click buy now free cheap login cart deal best price shipping offer win prize".split()
    for name, words in (("hq.txt", good), ("lq.txt", bad)):
        paras = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(80)]
        (root / name).write_text("\n\n".join(paras))
    train_classifier("quality", [Source(root / "hq.txt", "hq"), Source(root / "lq.txt", "lq")], root / "model",
                     threads=1, holdout=0.2, epoch=5, min_label_examples=10)
    return root / "model"


def test_classify_batched_scores_equal_one_document_at_a_time_and_the_model(tmp_path: Path) -> None:
    from curation.classify import Classifier, ClassifyTagger

    model = _quality_model(tmp_path)
    rng = random.Random(1)
    vocab = "the study found click buy free students writing price reasoning offer every".split()
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 60))) for _ in range(300)]

    def docs() -> list[Document]:
        return [Document(id=str(i), text=t, source="t") for i, t in enumerate(texts)]

    batched = ClassifyTagger(quality_model=str(model), min_quality=0.5, batch_size=64)
    one_by_one = ClassifyTagger(quality_model=str(model), min_quality=0.5, batch_size=1)
    got = _outcome(batched, docs())
    assert got == _outcome(one_by_one, docs())
    expected = Classifier(model).quality_scores(texts)
    scores = {i: a["quality.score"] for i, a, _ in got[0]}
    assert scores and all(scores[i] == round(float(expected[int(i)]), 6) for i in scores)
    assert sum(got[1].values()) == 300 - len(scores) > 0


# --- third-party steps -------------------------------------------------------------------------

STEPS_MODULE = '''
from typing import ClassVar

from curation.document import Document
from curation.step import Filter, Mapper


class Shout(Mapper):
    name = "shout"

    def __init__(self, suffix: str = "!") -> None:
        super().__init__()
        self.suffix = suffix

    def apply(self, doc: Document) -> Document:
        doc.text = doc.text + self.suffix
        return doc


class ResourceProbe(Filter):
    """Stores the CPUs Ray reserved for the task that runs it."""

    name = "probe"
    resources: ClassVar[dict[str, float]] = {"cpus": 2}

    def annotate(self, doc: Document) -> None:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0) if ray.is_initialized() else 0
        doc.attributes["probe.cpus"] = cpus

    def reject(self, doc: Document) -> str | None:
        return None


class NotAStep:
    pass


def timed_resources(_: int) -> dict:
    """A task that holds its CPUs for half a second and says which it was given."""
    import time

    import ray

    start = time.monotonic()
    time.sleep(0.5)
    return {"start": start, "end": time.monotonic(), "assigned": ray.get_runtime_context().get_assigned_resources()}
'''


@pytest.fixture
def steps_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"a2_steps_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(STEPS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _dolma_input(folder: Path, texts: list[str]) -> Path:
    path = folder / "in.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(orjson.dumps({"id": f"d{i}", "text": t}) + b"\n"
                                            for i, t in enumerate(texts))))
    return path


def test_a_step_named_module_colon_class_is_imported_checked_and_run(steps_module: str, tmp_path: Path) -> None:
    cfg = CurationConfig.from_dict({"reader": "dolma", "steps": [{f"{steps_module}:Shout": {"suffix": "?!"}}]})
    validate_buildable(cfg)
    out = tmp_path / "out"
    curate(cfg, [str(_dolma_input(tmp_path, ["a", "b"]))], out, progress=False)
    stats = json.loads((out / "stats.json").read_text())
    assert [s["name"] for s in stats["steps"]] == ["read", "shout"]
    from curation.writer import read_documents

    texts = [d.text for f in stats["files"] for d in read_documents(out / f["path"])]
    assert texts == ["a?!", "b?!"]


def test_third_party_parameters_are_checked_like_built_in_ones(steps_module: str) -> None:
    with pytest.raises(ConfigError, match=rf"step `{steps_module}:Shout`: parameter `suffix` must be a string, got int"):
        validate_buildable(CurationConfig.from_dict({"reader": "dolma", "steps": [{f"{steps_module}:Shout": {"suffix": 1}}]}))
    with pytest.raises(ConfigError, match="has no parameter 'sufix'.*did you mean 'suffix'"):
        build(f"{steps_module}:Shout", {"sufix": "!"}, DOC_STEPS)


@pytest.mark.parametrize(("name", "table", "message"), [
    ("a2_no_such_module:Shout", DOC_STEPS, "module 'a2_no_such_module' not found; install its package or add"),
    ("{mod}:Shoot", DOC_STEPS, "has no class 'Shoot' .*did you mean 'Shout'"),
    ("{mod}:NotAStep", DOC_STEPS, r"is not a document step: NotAStep must subclass curation\.step\.Step"),
    ("{mod}:Shout", DEDUP_STEPS, r"is not a dedup step: Shout must subclass curation\.dedup\.cluster\.DedupStep"),
])
def test_a_third_party_step_that_cannot_be_used_is_a_clear_config_error(
        steps_module: str, name: str, table: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(name.format(mod=steps_module), {}, table)


def test_an_import_error_inside_the_module_names_the_missing_dependency(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a2_needs_dep.py").write_text("import a2_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot be built: No module named 'a2_missing_dependency'"):
        CurationConfig.load(_yaml(tmp_path, "steps:\n  - a2_needs_dep:Step: {}\n"))


def test_a_third_party_name_goes_where_any_step_goes_and_typos_stay_errors() -> None:
    with pytest.raises(ConfigError, match="unknown step 'gopher_qualty'.*did you mean 'gopher_quality'"):
        CurationConfig.from_dict({"steps": ["gopher_qualty"]})
    cfg = CurationConfig.from_dict({"steps": ["pkg.mod:Tagger"], "dedup": [{"pkg.mod:Dedup": {"k": 1}}]})
    assert [s.name for s in cfg.steps] == ["pkg.mod:Tagger"] and cfg.dedup[0].params == {"k": 1}


# --- per-step resources --------------------------------------------------------------------------


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_resources_are_taken_out_of_the_parameters_and_checked(tmp_path: Path) -> None:
    cfg = CurationConfig.load(_yaml(tmp_path, """\
        reader: {dolma: {resources: {memory_gb: 1}}}
        steps:
          - gopher_quality: {min_doc_words: 20, resources: {cpus: 2, memory_gb: 0.5}}
          - language: {}
        """))
    assert cfg.steps[0].params == {"min_doc_words": 20}
    assert cfg.steps[0].resources == {"cpus": 2, "memory_gb": 0.5} and cfg.reader.resources == {"memory_gb": 1}
    assert phase_resources([cfg.reader, *cfg.steps]) == {"cpus": 2, "memory_gb": 1}
    again = CurationConfig.from_dict(cfg.to_dict())
    assert again.steps[0].resources == cfg.steps[0].resources and again.reader.resources == {"memory_gb": 1}
    # Resources place tasks; they do not change the output, so a run resumes with other ones.
    plain = CurationConfig.from_dict({"reader": "dolma", "steps": [{"gopher_quality": {"min_doc_words": 20}},
                                                                   "language"]})
    assert cfg.fingerprint() == plain.fingerprint()
    with pytest.raises(ConfigError, match="unknown resource 'gpu'.*did you mean 'gpus'"):
        CurationConfig.from_dict({"steps": [{"language": {"resources": {"gpu": 1}}}]})
    with pytest.raises(ConfigError, match="resource `cpus` must be a number >= 0, got -1"):
        CurationConfig.from_dict({"steps": [{"language": {"resources": {"cpus": -1}}}]})


def test_a_step_class_declares_default_resources_the_config_overrides(steps_module: str) -> None:
    probe = f"{steps_module}:ResourceProbe"
    cfg = CurationConfig.from_dict({"steps": [probe, {"language": {"resources": {"gpus": 1}}}]})
    assert phase_resources(cfg.steps) == {"cpus": 2, "gpus": 1}
    cfg = CurationConfig.from_dict({"steps": [{probe: {"resources": {"cpus": 1}}}]})
    assert phase_resources(cfg.steps) == {"cpus": 1}
    assert phase_resources([]) == {}


def test_resources_become_ray_task_options() -> None:
    assert ray_task_options(None) == {"num_cpus": 1.0}
    assert ray_task_options({"cpus": 2, "gpus": 0.5, "memory_gb": 1.5}) == {
        "num_cpus": 2, "num_gpus": 0.5, "memory": 1536 * 1024**2}
    assert ray_task_options({"gpus": 0}, default_cpus=0.5) == {"num_cpus": 0.5}
    # In one process there is nothing to reserve: the local executor runs whatever is asked.
    assert LocalExecutor(progress=False).map(str, [1, 2], resources={"gpus": 8}) == ["1", "2"]


@pytest.fixture(scope="module")
def ray_two_cpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RayExecutor, Any]]:
    """A local Ray with 2 CPUs whose workers can import a test's step module (from PYTHONPATH)."""
    import os

    folder = tmp_path_factory.mktemp("ray_steps")
    (folder / "a2_ray_steps.py").write_text(STEPS_MODULE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.syspath_prepend(str(folder))
        import a2_ray_steps
        import ray

        # A Ray left running by an earlier test has workers without this PYTHONPATH and other CPUs.
        if ray.is_initialized():
            ray.shutdown()
        ex = RayExecutor(num_cpus=2, progress=False)
        try:
            yield ex, a2_ray_steps.timed_resources
        finally:
            ex.shutdown()


def test_ray_reserves_the_cpus_a_task_asks_for(ray_two_cpus: tuple[RayExecutor, Any]) -> None:
    ex, timed_resources = ray_two_cpus
    two = ex.map(timed_resources, [0, 1], resources={"cpus": 2})
    assert [r["assigned"]["CPU"] for r in two] == [2.0, 2.0]
    first, second = sorted(two, key=lambda r: r["start"])
    assert second["start"] >= first["end"]  # 2 CPUs in all: one such task at a time
    assert [r["assigned"]["CPU"] for r in ex.map(timed_resources, [0], resources={"cpus": 1})] == [1.0]


def test_asking_for_more_gpus_than_the_cluster_has_fails_before_starting(
        ray_two_cpus: tuple[RayExecutor, Any]) -> None:
    ex, timed_resources = ray_two_cpus
    t0 = time.monotonic()
    with pytest.raises(InsufficientResourcesError, match=r"each task asks for 1 CPUs, 4 GPUs.*no node"):
        ex.map(timed_resources, [0], resources={"gpus": 4})
    with pytest.raises(InsufficientResourcesError, match="3 CPUs"):
        ex.check_resources({"cpus": 3})
    assert time.monotonic() - t0 < 10


def test_the_pipeline_asks_ray_for_the_phase_resources(ray_two_cpus: tuple[RayExecutor, Any], tmp_path: Path) -> None:
    cfg = CurationConfig.from_dict({"reader": "dolma", "steps": ["a2_ray_steps:ResourceProbe",
                                                                 {"language": {"languages": None, "min_score": 0.0}}]})
    out = tmp_path / "out"
    curate(cfg, [str(_dolma_input(tmp_path, [EN, DE]))], out, executor="ray", progress=False)
    from curation.writer import read_documents

    files = json.loads((out / "stats.json").read_text())["files"]
    assert [d.attributes["probe.cpus"] for f in files for d in read_documents(out / f["path"])] == [2.0, 2.0]
    # A GPU step after dedup: refused before phase 1 runs, not after it.
    gpus = CurationConfig.from_dict({"reader": "dolma", "steps": ["language"],
                                     "after_dedup": [{"language": {"resources": {"gpus": 1}}}]})
    with pytest.raises(InsufficientResourcesError, match="GPUs"):
        curate(gpus, [str(_dolma_input(tmp_path, [EN]))], tmp_path / "gpu", executor="ray", progress=False)
    assert not (tmp_path / "gpu" / "_work" / "stage1").exists()
