"""Verifiers: GSM8K numbers, MATH equivalence through math-verify, format tags, LLM judges; readers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from training.rewards import make_verifier, read_tasks
from training.rewards.base import RewardResult
from training.rewards.format import FormatVerifier, extract_tag
from training.rewards.gsm8k import GSM8KVerifier, parse_number
from training.rewards.judge import HTTPJudge, LLMJudge, parse_score
from training.rewards.math import MathVerifier, last_boxed


def test_reward_results_outside_zero_one_are_refused() -> None:
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        RewardResult(1.5, "too good")


# ----------------------------------------------------------------------------- GSM8K
@pytest.mark.parametrize("completion, score", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", 1.0),
    ("#### $18.00", 1.0),
    ("<think>16-3-4=9, 9*2=18</think><answer>18</answer>", 1.0),
    ("The answer is \\boxed{18}.", 1.0),
    ("so the total is 18.", 1.0),           # flexible: the last number
    ("#### 17", 0.0),
    ("#### 18\nand then some more text 5", 1.0),  # the #### line wins over later numbers
    ("I do not know.", 0.0),
])
def test_gsm8k_reads_the_final_number(completion: str, score: float) -> None:
    assert GSM8KVerifier()(completion, "18").score == score


def test_gsm8k_numbers_compare_exactly_and_strict_mode_needs_hashes() -> None:
    v = GSM8KVerifier()
    assert v("#### 1,000", "1000").score == 1.0
    assert v("#### -3.50", "-3.5").score == 1.0
    assert parse_number("costs $1,234.50 in total.") == parse_number("1234.5")
    assert GSM8KVerifier(strict=True)("the answer is 18", "18").score == 0.0
    assert GSM8KVerifier(strict=True)("#### 18", "18").score == 1.0
    with pytest.raises(ValueError, match="holds no number"):
        v("#### 1", "n/a")


@pytest.mark.integration
def test_gsm8k_every_reference_solution_scores_one_against_its_gold(shared_data: Path) -> None:
    path = shared_data / "verifiable" / "gsm8k" / "test.jsonl"
    tasks = read_tasks("gsm8k", str(path))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(tasks) == len(rows) == 1319
    assert tasks[0].ground_truth == "18" and tasks[0].messages[0]["role"] == "user"
    assert "####" in tasks[0].messages[0]["content"]  # the instruction names the answer format
    v = make_verifier("gsm8k")
    scores = v.score_batch([r["answer"] for r in rows], [t.ground_truth for t in tasks])
    assert all(s.score == 1.0 for s in scores)
    # Another row's solution is wrong for (almost) every question.
    shifted = v.score_batch([r["answer"] for r in rows[1:]], [t.ground_truth for t in tasks[:-1]])
    assert sum(s.score for s in shifted) < 0.05 * len(shifted)


def test_gsm8k_reader_names_the_bad_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a #### 3"}\n{"question": "q2", "answer": "no hashes"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*####"):
        read_tasks("gsm8k", str(bad))


# ----------------------------------------------------------------------------- MATH
@pytest.mark.parametrize("gold, completion", [
    ("\\frac12", "So the answer is $\\boxed{0.5}$."),
    ("0.5", "Thus \\boxed{\\frac{1}{2}}"),
    ("\\dfrac{3}{4}", "\\boxed{0.75}"),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\sqrt2/2}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "The point is \\boxed{(3, \\pi/2)}"),
    ("[-2,7]", "<answer>$[-2, 7]$</answer>"),
    ("10\\%", "\\boxed{10}"),
])
def test_math_equivalent_forms_match(gold: str, completion: str) -> None:
    result = MathVerifier()(completion, gold)
    assert result.score == 1.0, result.reason


def test_math_wrong_or_missing_answers_score_zero() -> None:
    v = MathVerifier()
    assert v("\\boxed{3}", "2").score == 0.0
    assert v("\\boxed{\\frac{1}{3}}", "0.5").score == 0.0
    assert v("no idea", "2").score == 0.0


def test_last_boxed_handles_nested_braces() -> None:
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert last_boxed("no box") is None


@pytest.mark.integration
def test_math500_gold_answers_match_their_solutions_last_box(shared_data: Path) -> None:
    tasks = read_tasks("math", str(shared_data / "verifiable" / "math" / "math500_test.jsonl"))
    rows = [json.loads(line) for line in (shared_data / "verifiable" / "math" / "math500_test.jsonl").open()]
    assert len(tasks) == 500 and tasks[0].meta["level"] == 2
    v = MathVerifier()
    # Every fifth row: the explicit `answer` and the solution's last \boxed{} are two forms of one answer.
    picked = range(0, 500, 5)
    scores = v.score_batch([rows[i]["solution"] for i in picked], [tasks[i].ground_truth for i in picked])
    assert [rows[i]["unique_id"] for i, s in zip(picked, scores, strict=True) if s.score != 1.0] == []
    # Integer answers moved by one no longer match.
    ints = [t for t in tasks if t.ground_truth.strip().isdigit()][:40]
    off = v.score_batch([f"\\boxed{{{int(t.ground_truth) + 1}}}" for t in ints], [t.ground_truth for t in ints])
    assert all(s.score == 0.0 for s in off)


@pytest.mark.integration
def test_math_test_set_reader_takes_the_last_box_of_each_solution(shared_data: Path) -> None:
    tasks = read_tasks("math", str(shared_data / "verifiable" / "math" / "math_test_5000.jsonl"))
    assert len(tasks) == 5000
    assert tasks[0].ground_truth == "2"
    assert all(t.ground_truth.strip() for t in tasks)


def test_math_verifier_runs_in_worker_threads() -> None:
    # math-verify's signal-based timeout works on the main thread only; elsewhere it must still score.
    out: list[float] = []
    worker = threading.Thread(target=lambda: out.append(MathVerifier()("\\boxed{0.5}", "\\frac12").score))
    worker.start()
    worker.join()
    assert out == [1.0]


# ----------------------------------------------------------------------------- format
@pytest.mark.parametrize("completion, score", [
    ("<think>add them</think><answer>5</answer>", 1.0),
    ("\n<think>\nadd them\n</think>\n\n<answer> 5 </answer>\n", 1.0),
    ("<answer>5</answer>", 0.0),
    ("<think>x</think>", 0.0),
    ("<answer>5</answer><think>x</think>", 0.0),
    ("preamble <think>x</think><answer>5</answer>", 0.0),
    ("<think>x</think><answer>5</answer> trailing", 0.0),
    ("<think>x</think><think>y</think><answer>5</answer>", 0.0),
    ("<think> </think><answer>5</answer>", 0.0),
])
def test_format_reward_wants_reasoning_then_answer_and_nothing_else(completion: str, score: float) -> None:
    assert FormatVerifier()(completion).score == score


def test_format_tags_are_configurable_and_extract_tag_takes_the_last() -> None:
    assert FormatVerifier("reasoning", "final")("<reasoning>r</reasoning><final>f</final>").score == 1.0
    assert extract_tag("<answer>1</answer> <answer> 2 </answer>", "answer") == "2"
    with pytest.raises(ValueError, match="two different names"):
        FormatVerifier("answer", "answer")


# ----------------------------------------------------------------------------- judge
@pytest.mark.parametrize("reply, score", [
    ("Solid answer.\nScore: 8", 0.8),
    ("Rating: [[3]]", 0.3),
    ('{"score": 10, "why": "perfect"}', 1.0),
    ("I'd give it 7/10.", 0.7),
    ("6 out of 10", 0.6),
    ("**9**", 0.9),
    ("Score: 4\nOn reflection, Score: 2", 0.2),
    ("Score: 11", None),
    ("Great answer, very helpful!", None),
    ("", None),
])
def test_judge_scores_are_parsed_from_the_forms_judges_write(reply: str, score: float | None) -> None:
    got = parse_score(reply, 10)
    assert got == pytest.approx(score) if score is not None else got is None


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions from a script keyed by the response under judgement."""

    script: dict[str, tuple[int, str]] = {}
    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        prompt = body["messages"][0]["content"]
        key = next(k for k in self.script if f"[Response]\n{k}\n" in prompt)
        status, reply = self.script[key]
        if key == "flaky" and sum("[Response]\nflaky\n" in s["messages"][0]["content"] for s in self.seen) == 1:
            status = 503  # the first try fails, the retry succeeds
        payload = reply if status != 200 or reply.startswith("RAW:") else json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": reply}}]})
        data = payload.removeprefix("RAW:").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def judge_server() -> Iterator[str]:
    _FakeOpenAI.script = {
        "good": (200, "Accurate and complete.\nScore: 9"),
        "bad": (200, "Wrong. [[2]]"),
        "rambling": (200, "This response is quite something, I cannot decide."),
        "broken": (200, "RAW:{not json"),
        "flaky": (200, "Score: 5"),
        "forbidden": (403, "no"),
    }
    _FakeOpenAI.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_http_judge_scores_and_counts_unparseable_and_failed_replies(judge_server: str) -> None:
    judge = LLMJudge(HTTPJudge(judge_server, model="judge-model", api_key="k", retries=1))
    responses = ["good", "bad", "rambling", "broken", "flaky", "forbidden"]
    results = judge.score_batch(responses, [{"question": "What is 2+2?", "reference": "4"}] * len(responses))
    assert [r.score for r in results] == [0.9, 0.2, 0.0, 0.0, 0.5, 0.0]
    assert "unparseable" in results[2].reason and "failed" in results[3].reason
    assert judge.stats == {"judged": 6, "unparseable": 1, "errors": 2}
    first = _FakeOpenAI.seen[0]
    assert first["model"] == "judge-model" and first["temperature"] == 0.0
    assert "[Reference answer]\n4" in first["messages"][0]["content"]
    assert sum("[Response]\nforbidden\n" in s["messages"][0]["content"] for s in _FakeOpenAI.seen) == 1  # no retry on 4xx


def test_http_judge_unreachable_endpoint_counts_errors() -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = LLMJudge(HTTPJudge(f"http://127.0.0.1:{port}/v1", model="m", retries=0, timeout_s=2))
    assert judge("anything", "a question").score == 0.0
    assert judge.stats["errors"] == 1
    with pytest.raises(ValueError, match="must start with http"):
        HTTPJudge("127.0.0.1:8000", model="m")


def _scripted_hf_judge(tmp_path: Path, word: str) -> Path:
    """A Llama export whose greedy reply is `word` repeated: every input embeds alike, the blocks add
    nothing, and only `word`'s row of the LM head is non-zero. Its tokenizer is word-level."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    from training.export import export_hf
    from training.model import ModelConfig, Transformer

    tmp_path.mkdir(parents=True, exist_ok=True)
    words = ["[UNK]", "<eos>", word] + [f"w{i}" for i in range(3, 64)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = ModelConfig.from_dict(dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=64,
                                     max_seq_len=1024, tie_embeddings=False))
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed_tokens.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
        model.lm_head.weight[2] = 1.0
    return export_hf(model, tmp_path / "hf", tokenizer_path=tmp_path / "tokenizer.json", eos_id=1)


def test_local_hf_judge_generates_and_its_reply_is_parsed(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from training.rewards.judge import HFJudge

    judge = LLMJudge(HFJudge(_scripted_hf_judge(tmp_path / "a", "[[7]]"), max_new_tokens=3, batch_size=2))
    results = judge.score_batch(["first", "second", "third"], ["q1", "q2", {"question": "q3", "rubric": "r"}])
    assert [r.score for r in results] == [pytest.approx(0.7)] * 3
    assert judge.stats == {"judged": 3, "unparseable": 0, "errors": 0}
    mute = LLMJudge(HFJudge(_scripted_hf_judge(tmp_path / "b", "hmm"), max_new_tokens=3), unparseable_score=0.5)
    assert mute("an answer", "a question").score == 0.5
    assert mute.stats["unparseable"] == 1


def test_registry_names_every_family_and_refuses_unknown_ones() -> None:
    assert make_verifier("format")("<think>a</think><answer>b</answer>").score == 1.0
    with pytest.raises(ValueError, match="unknown verifier 'gsm9k'; choose one of code, format, gsm8k"):
        make_verifier("gsm9k")
    with pytest.raises(ValueError, match="unknown dataset"):
        read_tasks("mbpp", "x.jsonl")
