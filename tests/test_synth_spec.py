"""`refinery synth spec`: spec splitting, even coverage, drops, dedup, resumption, and the whole path
(generate → corpus → tokenize → mix manifest → mid-training) with a local model and an HTTP server."""

from __future__ import annotations

import gzip
import json
import random
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipelines.synth.prompts import DOC_TYPES, check_doc_types, plan_jobs
from pipelines.synth.quality import drop_reason, is_refusal, near_duplicates
from pipelines.synth.run import SynthError, SynthSettings, synthesize_spec
from pipelines.synth.spec import SpecError, load_spec, parse_spec
from training.llm_client import LLMClientError, OpenAIChatClient
from training.sampling import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SPEC = REPO_ROOT / "pipelines" / "specs" / "assistant_spec.md"
SMALL_SPEC = """# Tiny Spec

The assistant is helpful and honest.

## Honesty
- Say only what is true.
- Admit mistakes.

## Helpfulness
Answer the question asked.

Ask when a request is unclear.

## Safety
### Harm
- Decline to help with serious harm.
"""


def read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def corpus_docs(root: Path) -> list[dict[str, Any]]:
    stats = json.loads((root / "stats.json").read_text())
    return [d for f in stats["files"] for d in read_jsonl_gz(root / f["path"])]


# ----------------------------------------------------------------------------- spec and plan
def test_spec_is_split_into_sections_and_principles() -> None:
    text = SMALL_SPEC + "\n## Examples\n```\n# not a heading\n```\n"
    spec = parse_spec(text, "tiny.md")
    assert spec.title == "Tiny Spec"
    assert [s.label for s in spec.sections] == ["Overview", "Honesty", "Helpfulness", "Safety > Harm", "Examples"]
    by = {s.title: s for s in spec.sections}
    assert by["Honesty"].principles == ("Say only what is true.", "Admit mistakes.")
    assert by["Helpfulness"].principles == ("Answer the question asked.", "Ask when a request is unclear.")
    assert "# not a heading" in by["Examples"].text  # a '#' inside a code fence is text
    assert len({s.id for s in spec.sections}) == len(spec.sections)
    with pytest.raises(SpecError, match="no section with text"):
        parse_spec("# Only a title\n\n## Empty\n", "empty.md")


def test_plan_covers_every_section_and_document_type_evenly_and_is_prefix_stable() -> None:
    spec = load_spec(EXAMPLE_SPEC)
    types = check_doc_types(None)
    n_sec, n_types = len(spec.sections), len(types)
    jobs = plan_jobs(spec, 3 * n_sec * n_types + 5, types, seed=3)
    for end in range(n_sec, len(jobs), n_sec):  # every prefix of whole rounds: each section equally
        assert set(Counter(j.section_id for j in jobs[:end]).values()) == {end // n_sec}
    pairs = Counter((j.section_id, j.doc_type) for j in jobs[: n_sec * n_types])
    assert len(pairs) == n_sec * n_types and set(pairs.values()) == {1}
    honesty = [j.principle for j in jobs if j.section == "Honesty"]
    assert set(honesty[:5]) == set(spec.section("s04-honesty").principles)  # every principle before a repeat
    assert [j.messages for j in plan_jobs(spec, 17, types, seed=3)] == [j.messages for j in jobs[:17]]
    conflict = next(j for j in jobs if j.doc_type == "conflict")
    assert conflict.other_section and conflict.other_section != conflict.section
    assert "On priorities, the spec says" in conflict.messages[1]["content"] or conflict.section == "Priorities"
    with pytest.raises(ValueError, match="unknown document type"):
        check_doc_types(["poem"])


def test_refusals_are_recognised_at_the_opening_only() -> None:
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("  As an AI language model, I cannot write this.")
    assert is_refusal("I cannot assist with that request.")
    assert not is_refusal("The user asks for a weapon. The assistant replies: I'm sorry, I can't help with that.")
    assert drop_reason(None, 5) == "generator_error"
    assert drop_reason("  \n ", 5) == "empty"
    assert drop_reason("Too short.", 5) == "too_short"
    assert drop_reason("Sorry, I won't write that document for you today.", 5) == "refusal"
    assert drop_reason("A complete document about honesty with enough words in it.", 5) is None


def test_near_duplicates_keep_the_earliest_of_each_group() -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(300)]
    base = [rng.choice(vocab) for _ in range(200)]
    near = base.copy()
    near[100] = "changed"
    other = [rng.choice(vocab) for _ in range(200)]
    texts = [" ".join(other), " ".join(base), " ".join(near), " ".join(base), "short text"]
    assert near_duplicates(texts) == {2: 1, 3: 1}
    assert near_duplicates(texts, threshold=1.0) == {3: 1}


# ----------------------------------------------------------------------------- an OpenAI-compatible stub
class StubLLM:
    """Canned chat completions on 127.0.0.1: every 10 requests give 1 empty, 1 refusal, 1 near-duplicate
    of one long text and 7 unique documents; `fail_after` successful replies, it answers 503."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.served = 0
        self.kinds: Counter[str] = Counter()
        self.fail_after: int | None = None
        self.bodies: list[dict[str, Any]] = []
        rng = random.Random(1)
        self.vocab = [f"word{i}" for i in range(400)]
        self.base = [rng.choice(self.vocab) for _ in range(200)]

    def reply(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            if self.fail_after is not None and self.served >= self.fail_after:
                return 503, {"error": "overloaded"}
            n = self.served
            self.served += 1
            self.bodies.append(body)
            kind = {0: "empty", 1: "refusal", 2: "dup"}.get(n % 10, "unique")
            self.kinds[kind] += 1
        assert body["messages"][0]["role"] == "system" and body["model"] == "stub-model"
        if kind == "empty":
            content: str | None = None if n % 20 == 0 else "   "
        elif kind == "refusal":
            content = ["I'm sorry, but I can't write that.", "As an AI, I cannot help with this request."][n % 2]
        elif kind == "dup":
            words = self.base.copy()
            words[n % 200] = f"variant{n}"
            content = " ".join(words)
        else:
            rng = random.Random(f"{n}:{body['seed']}")
            content = "Q: " + " ".join(rng.choice(self.vocab) for _ in range(60))
        finish = "length" if n % 7 == 3 else "stop"
        return 200, {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish}]}


@pytest.fixture
def stub_server() -> Iterator[tuple[str, StubLLM]]:
    stub = StubLLM()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self._send(200, {"data": [{"id": "stub-model", "object": "model"}]} if self.path == "/v1/models"
                       else {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": "not found"})
                return
            self._send(*stub.reply(body))

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", stub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.integration
def test_cli_with_an_http_generator_writes_a_deduplicated_corpus_with_counted_drops(
        stub_server: tuple[str, StubLLM], tmp_path: Path, chat_tokenizer: Path) -> None:
    from curation.tokenize import tokenize_corpus
    from pipelines.cli import main

    url, stub = stub_server
    out = tmp_path / "synth"
    n = 40
    assert main(["-q", "synth", "spec", str(EXAMPLE_SPEC), "--generator", url, "--documents", str(n),
                 "--output", str(out), "--batch-size", "8", "--concurrency", "4"]) == 0
    assert stub.served == n
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped"] == {"empty": stub.kinds["empty"], "refusal": stub.kinds["refusal"],
                                "dedup.minhash": stub.kinds["dup"] - 1}
    docs = corpus_docs(out)
    assert len(docs) == stats["documents_written"] == n - sum(stats["dropped"].values())
    assert len({d["id"] for d in docs}) == len(docs)
    assert all(set(d) == {"id", "text", "source", "added", "created", "metadata"} for d in docs)
    assert {d["source"] for d in docs} == {"spec-synthetic"}
    meta = docs[0]["metadata"]
    assert {"section", "doc_type", "prompt_id", "generator"} <= set(meta)
    assert meta["generator"] == {"backend": "openai-http", "endpoint": url, "model": "stub-model"}
    spec = load_spec(EXAMPLE_SPEC)
    # Every section was asked for equally (40 prompts / 8 sections); the drops decide what is kept.
    assert set(stats["requested_by_section"].values()) == {n // len(spec.sections)}
    assert sum(stats["kept_by_section"].values()) == len(docs)
    assert stats["truncated_kept"] > 0
    dropped = read_jsonl_gz(out / "dropped.jsonl.gz")
    assert Counter(d["reason"] for d in dropped) == Counter(stats["dropped"])
    assert all(d["duplicate_of"] < d["prompt_id"] for d in dropped if d["reason"] == "dedup.minhash")
    prompts = read_jsonl_gz(out / "prompts.jsonl.gz")
    assert [p["prompt_id"] for p in prompts] == [f"p{k:07d}" for k in range(n)]
    record = json.loads((out / "synth.json").read_text())
    assert record["settings"]["temperature"] == 0.8 and set(record["templates"]["doc_types"]) == set(DOC_TYPES)
    assert (out / "spec.md").read_text() == EXAMPLE_SPEC.read_text()
    manifest = tokenize_corpus(out, chat_tokenizer, tmp_path / "tokens")
    assert manifest["total_documents"] == len(docs) and manifest["total_tokens"] > 0

    # A finished run rerun sends nothing; a larger --documents continues the same plan.
    assert main(["-q", "synth", "spec", str(EXAMPLE_SPEC), "--generator", url, "--documents", str(n),
                 "--output", str(out), "--batch-size", "8"]) == 0
    assert stub.served == n
    assert main(["-q", "synth", "spec", str(EXAMPLE_SPEC), "--generator", url, "--documents", "52",
                 "--output", str(out), "--batch-size", "8"]) == 0
    assert stub.served == 52
    grown = corpus_docs(out)
    assert {d["id"] for d in docs} <= {d["id"] for d in grown}


def test_a_run_stopped_by_a_failing_generator_resumes_without_generating_twice(
        stub_server: tuple[str, StubLLM], tmp_path: Path) -> None:
    url, stub = stub_server
    client = OpenAIChatClient(url, retries=0, concurrency=2)
    settings = SynthSettings(documents=24, batch_size=5, max_new_tokens=64)
    stub.fail_after = 12  # batches 0-1 finish, batch 2 half-fails (marker with errors), batch 3 fails whole
    with pytest.raises(SynthError, match="all 5 requests of batch 3 failed .*HTTP 503.*rerun"):
        synthesize_spec(EXAMPLE_SPEC, client, tmp_path / "out", settings, progress=False)
    assert not (tmp_path / "out" / "stats.json").exists()  # an unfinished corpus is not readable
    from curation.corpus import CorpusError
    from curation.tokenize import corpus_files

    with pytest.raises(CorpusError, match="has not finished"):
        corpus_files(tmp_path / "out")
    assert stub.served == 12
    stub.fail_after = None
    stats = synthesize_spec(EXAMPLE_SPEC, client, tmp_path / "out", settings, progress=False)
    assert stub.served == 24  # the 12 failed prompts only
    assert stats["this_call"] == {"requested": 12, "failed": 0}
    assert stats["documents_written"] + sum(stats["dropped"].values()) == 24
    assert "generator_error" not in stats["dropped"]

    changed = SynthSettings(documents=24, batch_size=5, max_new_tokens=64, temperature=0.5)
    with pytest.raises(SynthError, match="temperature"):
        synthesize_spec(EXAMPLE_SPEC, client, tmp_path / "out", changed, progress=False)
    stats = synthesize_spec(EXAMPLE_SPEC, client, tmp_path / "out", changed, progress=False, overwrite=True)
    assert stub.served == 48 and stats["documents_requested"] == 24


def test_http_client_sends_the_rollout_sampling_parameters(stub_server: tuple[str, StubLLM]) -> None:
    url, stub = stub_server
    client = OpenAIChatClient(url, model="stub-model", retries=0)
    params = SamplingParams(max_new_tokens=8, temperature=0.5, top_p=0.9, top_k=20, stop=("###",), seed=7)
    client.complete([[{"role": "system", "content": "x"}]] * 2, params)
    sent = sorted(stub.bodies, key=lambda b: b["seed"])
    assert [b["seed"] for b in sent] == [7, 8]  # item i gets seed + i
    assert all(b["max_tokens"] == 8 and b["temperature"] == 0.5 and b["top_p"] == 0.9 and b["top_k"] == 20
               and b["stop"] == ["###"] for b in sent)
    client.complete([[{"role": "system", "content": "x"}]], SamplingParams(max_new_tokens=8))
    assert "top_k" not in stub.bodies[-1] and "stop" not in stub.bodies[-1]  # OpenAI itself refuses top_k
    with pytest.raises(ValueError, match="one reply per conversation"):
        client.complete([[{"role": "system", "content": "x"}]], SamplingParams(n=2))


def test_generator_and_spec_errors_are_one_clear_line(stub_server: tuple[str, StubLLM], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main

    with pytest.raises(LLMClientError, match="cannot list the models"):
        OpenAIChatClient("http://127.0.0.1:9/v1", retries=0, timeout_s=2)
    url, stub = stub_server
    client = OpenAIChatClient(url + "/nope", model="stub-model", retries=0)
    [reply] = client.complete([[{"role": "system", "content": "x"}]], SamplingParams(max_new_tokens=8))
    assert reply.text is None and reply.error == "HTTP 404"
    bad = tmp_path / "bad.md"
    bad.write_text("just one line of text, no headings\n")
    bad_args = ["--documents", "4", "--output", str(tmp_path / "o")]
    assert main(["-q", "synth", "spec", str(bad), "--generator", url, *bad_args]) == 2
    assert main(["-q", "synth", "spec", str(EXAMPLE_SPEC), "--generator", str(tmp_path / "nomodel"), *bad_args]) == 2
    assert main(["-q", "synth", "spec", str(EXAMPLE_SPEC), "--generator", "s3://bucket/model", *bad_args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "'## ' heading" in err[0] and "no config.json" in err[1] and "http://" in err[2]
    assert stub.served == 0


# ----------------------------------------------------------------------------- a local model
@pytest.fixture
def tiny_generator(chat_tokenizer: Path, tmp_path: Path) -> Path:
    """A random tiny Transformer exported as a Hugging Face dir with our chat tokenizer."""
    import torch

    from training.chat import ChatTemplate
    from training.export import export_hf, tokenizer_vocab_size
    from training.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer_vocab_size(chat_tokenizer), dim=32, n_layers=2, n_heads=2,
                      n_kv_heads=1, ffn_hidden=64, max_seq_len=1536)
    end = ChatTemplate.load(chat_tokenizer).end_id
    return export_hf(Transformer(cfg), tmp_path / "generator", chat_tokenizer, eos_id=end)


@pytest.mark.integration
def test_local_model_generates_a_corpus_that_tokenizes_and_mid_trains_in_a_mix(
        tiny_generator: Path, chat_tokenizer: Path, shared_data: Path, tmp_path: Path, one_thread: None) -> None:
    from curation.tokenize import tokenize_corpus
    from training.checkpoint import write_model_checkpoint
    from training.data import MixtureLoader, load_mix
    from training.engine import train_from_cli
    from training.export import import_hf
    from training.llm_client import LocalChatModel

    client = LocalChatModel(tiny_generator, device="cpu", max_batch=4)
    settings = SynthSettings(documents=8, batch_size=3, max_new_tokens=48, min_words=1, holdout=0.3)
    out = tmp_path / "synth"
    stats = synthesize_spec(write_small_spec(tmp_path), client, out, settings, progress=False)
    assert stats["generator"]["backend"] == "local" and stats["generator"]["template"] == "refinery.chat/1"
    kept = stats["documents_written"] + stats["heldout_written"]
    assert kept + sum(stats["dropped"].values()) == 8 and stats["documents_written"] > 0
    assert len(list((out / "_work" / "batches").glob("*.done"))) == 3
    assert set(stats["requested_by_section"].values()) == {2}  # 8 prompts over 4 sections
    held = corpus_docs(out / "heldout") if stats["heldout_written"] else []
    assert all(d["metadata"]["split"] == "heldout" for d in held)
    assert not {d["metadata"]["prompt_id"] for d in held} & {d["metadata"]["prompt_id"] for d in corpus_docs(out)}

    # The pool in a mid-training mix with web text, as the trainer reads it.
    tokenize_corpus(out, chat_tokenizer, tmp_path / "tok_spec")
    web = tmp_path / "web"
    web.mkdir()
    (web / "web.txt").write_text((shared_data / "text" / "tinyshakespeare" / "input.txt").read_text()[:40_000])
    tokenize_corpus(web, chat_tokenizer, tmp_path / "tok_web", suffixes=(".txt",))
    mix = tmp_path / "mix.yaml"
    mix.write_text("pools:\n  - {name: spec-synthetic, manifest: tok_spec, weight: 0.3}\n"
                   "  - {name: web, manifest: tok_web, weight: 0.7}\n")
    pools, _ = load_mix(mix)
    assert [p.name for p in pools] == ["spec-synthetic", "web"]
    loader = MixtureLoader(mix, seq_len=32, global_batch_size=4)
    inputs, _ = next(iter(loader))
    assert tuple(inputs.shape) == (4, 32)
    model = import_hf(tiny_generator)
    write_model_checkpoint(tmp_path / "base", model.state_dict(), model.cfg.to_dict())
    summary = train_from_cli("midtrain", str(REPO_ROOT / "training" / "configs" / "midtrain_spec_tiny.yaml"), [
        f"data.mix={mix}", f"data.eval={tmp_path / 'tok_web'}", "data.seq_len=32", "train.steps=3",
        "train.batch_size=4", "optim.warmup=1", "train.eval_every=3", "train.eval_batches=1",
        "train.log_every=1", "train.checkpoint_every=3", f"train.out_dir={tmp_path / 'run'}",
        f"train.init_from={tmp_path / 'base'}", "train.progress=false", "train.export_hf=false"])
    assert summary["step"] == 3 and summary["eval_loss"] > 0


def write_small_spec(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_spec.md"
    path.write_text(SMALL_SPEC)
    return path


def test_local_model_without_our_role_tokens_uses_its_chat_template(tmp_path: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from training.export import export_hf
    from training.llm_client import LocalChatModel
    from training.model import ModelConfig, Transformer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["write a short document about honesty and helpfulness"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                      ffn_hidden=64, max_seq_len=256)
    out = export_hf(Transformer(cfg), tmp_path / "llama", tmp_path / "tokenizer.json",
                    eos_id=tok.token_to_id("</s>"))
    with pytest.raises(LLMClientError, match="not a chat model"):
        LocalChatModel(out, device="cpu")
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]"
                "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>",
                                                           "eos_token": "</s>"}))
    client = LocalChatModel(out, device="cpu")
    ids = client.render([{"role": "user", "content": "honesty"}])
    assert ids[0] == tok.token_to_id("<s>") and ids[-1] == tok.token_to_id("[/INST]")
    replies = client.complete([[{"role": "user", "content": "honesty"}]] * 2, SamplingParams(max_new_tokens=8, seed=1))
    assert len(replies) == 2 and all(r.text is not None for r in replies)
    too_long = client.complete([[{"role": "user", "content": "honesty " * 400}]], SamplingParams(max_new_tokens=8))
    assert too_long[0].text is None and "exceeds the model's max_seq_len" in too_long[0].error
