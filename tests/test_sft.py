"""SFT and Proximal SFT: response-only loss, packing isolation, the clipped ratio, and runs on the engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.checkpoint import write_model_checkpoint
from training.config import load_config
from training.engine import train
from training.metrics import read_metrics
from training.model import ModelConfig, Transformer
from training.objectives.sft import masked_target_logprobs, pack_rows, proximal_loss, target_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 64
REPO_ROOT = Path(__file__).resolve().parents[1]


def write_chat_shards(root: Path, seqs: list[tuple[list[int], list[int]]], vocab: int = VOCAB) -> Path:
    """A chat shard directory by the contract of /training/chat.py, written by hand (no tokenizer)."""
    root.mkdir(parents=True)
    np.save(root / "a.tokens.npy", np.concatenate([np.array(s, np.uint16) for s, _ in seqs]))
    np.save(root / "a.mask.npy", np.concatenate([np.array(m, np.uint8) for _, m in seqs]))
    np.save(root / "a.idx.npy", np.cumsum([len(s) for s, _ in seqs]).astype(np.int64))
    manifest = {"format": "refinery.chat/1", "kind": "chat", "vocab_size": vocab, "tokenizer": "tokenizer.json",
                "examples": len(seqs), "shards": [{"tokens": "a.tokens.npy", "mask": "a.mask.npy",
                                                   "idx": "a.idx.npy", "sequences": len(seqs)}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def conversation(rng: np.random.Generator, turns: int) -> tuple[list[int], list[int]]:
    """[bos] (<user> prompt <end> <assistant> answer <end>) * turns; mask on answers and their <end>."""
    ids, mask = [1], [0]
    for _ in range(turns):
        prompt, answer = rng.integers(8, VOCAB, rng.integers(2, 6)), rng.integers(8, VOCAB, rng.integers(2, 6))
        ids += [2, *prompt, 4, 3, *answer, 4]
        mask += [0] * (len(prompt) + 3) + [1] * (len(answer) + 1)
    return ids, mask


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                   max_seq_len=128))


# ------------------------------------------------------------------------------------------ the loss


def test_prompt_tokens_get_no_loss_and_no_gradient() -> None:
    rng = np.random.default_rng(0)
    convs = [conversation(rng, 2), conversation(rng, 3)]
    t = pack_rows([[(np.array(s), np.array(m, bool))] for s, m in convs], packed=False)
    model = tiny_model()
    logits = model(t["inputs"]).detach().requires_grad_(True)
    mask = t["mask"].float()
    loss = -(target_logprobs(logits, t["targets"]) * mask).sum()
    loss.backward()
    # By hand: cross-entropy at the positions whose NEXT token is a masked (assistant) token.
    by_hand = sum(F.cross_entropy(logits[b, i], t["targets"][b, i], reduction="sum")
                  for b, (_, m) in enumerate(convs) for i in range(len(m) - 1) if m[i + 1])
    assert float(loss.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-6)
    assert int(mask.sum()) == sum(sum(m[1:]) for _, m in convs)
    # Positions predicting a prompt token (or padding) get exactly zero gradient; the others do not.
    grad_norm = logits.grad.abs().sum(-1)
    assert torch.all(grad_norm[~t["mask"]] == 0) and torch.all(grad_norm[t["mask"]] > 0)
    # Changing what the prompt positions should predict changes nothing.
    other = t["targets"].clone()
    other[~t["mask"]] = (other[~t["mask"]] + 7) % VOCAB
    assert float(-(target_logprobs(logits, other) * mask).sum().detach()) == float(loss.detach())


def test_the_objective_projects_only_response_positions_with_the_same_loss_and_gradients() -> None:
    # The SFT objective runs the LM head on loss-bearing positions alone; it must equal the full head.
    rng = np.random.default_rng(1)
    convs = [conversation(rng, 2), conversation(rng, 3), conversation(rng, 1)]
    for packed in (False, True):
        rows = [[(np.array(s), np.array(m, bool)) for s, m in convs]] if packed else \
            [[(np.array(s), np.array(m, bool))] for s, m in convs]
        t = pack_rows(rows, packed=packed)
        full, selected = tiny_model(), tiny_model()
        kw = {"position_ids": t["pos"], "segment_ids": t["seg"]} if packed else {}
        ref = -(target_logprobs(full(t["inputs"], **kw), t["targets"]) * t["mask"].float()).sum()
        ours = -masked_target_logprobs(selected, t).sum()
        assert float(ours) == pytest.approx(float(ref), rel=1e-5)
        ref.backward()
        ours.backward()
        for (name, a), b in zip(full.named_parameters(), selected.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_conversations_have_the_losses_they_have_alone() -> None:
    rng = np.random.default_rng(1)
    convs = [(np.array(s), np.array(m, bool)) for s, m in (conversation(rng, k) for k in (1, 3, 2))]
    model = tiny_model()
    packed = pack_rows([convs], packed=True)
    logp = target_logprobs(model(packed["inputs"], position_ids=packed["pos"], segment_ids=packed["seg"]),
                           packed["targets"])[0]
    plain_causal = target_logprobs(model(packed["inputs"]), packed["targets"])[0]
    mask, seg = packed["mask"][0], packed["seg"][0]
    for k, conv in enumerate(convs):
        alone = pack_rows([[conv]], packed=False)
        expected = -(target_logprobs(model(alone["inputs"]), alone["targets"]) * alone["mask"]).sum()
        in_row = mask & (seg == k)
        assert float(-(logp * in_row).sum().detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
        if k > 0:  # without the block-diagonal mask and restarted positions, the conversations mix
            assert abs(float(-(plain_causal * in_row).sum().detach()) - float(expected.detach())) > 1e-3
    assert packed["pos"][0, len(convs[0][0])] == 0  # positions restart in the second conversation


def test_proximal_sft_gives_no_gradient_to_tokens_past_the_upper_clip() -> None:
    eps = 0.28
    ratios = torch.tensor([[0.5, 0.9, 1.0, 1.2, 1.27, 1.3, 2.0]])
    old_logp = torch.full_like(ratios, -2.0)
    logp = (old_logp + ratios.log()).requires_grad_(True)
    mask = torch.ones_like(ratios)
    loss, metrics = proximal_loss(logp, old_logp, mask, eps)
    loss.backward()
    # d/dlogp of -r is -r while r <= 1 + eps (below 1 - eps too: with advantage 1 only the upper bound binds).
    expected = torch.where(ratios > 1 + eps, 0.0, -ratios)
    torch.testing.assert_close(logp.grad, expected)
    assert float(metrics["clip_frac"]) == 2.0
    assert float(loss) == pytest.approx(-float(torch.minimum(ratios, torch.tensor(1 + eps)).sum()))
    assert float(metrics["nll"]) == pytest.approx(float(-logp.sum()))


# ------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Hand-made chat shards (train / held-out) and a starting checkpoint of the tiny model."""
    root = tmp_path_factory.mktemp("sft")
    rng = np.random.default_rng(2)
    out = {"train": write_chat_shards(root / "train", [conversation(rng, int(rng.integers(1, 4))) for _ in range(96)]),
           "heldout": write_chat_shards(root / "heldout", [conversation(rng, 2) for _ in range(16)])}
    model = tiny_model(3)
    out["init"] = write_model_checkpoint(root / "init", model.state_dict(), model.cfg.to_dict())
    return out


def sft_overrides(chat_data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [f"data.mix={chat_data['train']}", f"data.eval={chat_data['heldout']}", "data.seq_len=64",
            f"train.init_from={chat_data['init']}", f"train.out_dir={out}", "train.batch_size=4",
            "optim.grad_accum=2", "optim.lr=3e-3", "optim.warmup=2", "train.steps=8", "train.log_every=1",
            "train.eval_every=4", "train.eval_batches=2", "train.progress=false", "train.export_hf=false", *extra]


def test_killed_proximal_sft_run_resumes_with_the_uninterrupted_losses(chat_data: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    # refresh_every=3 with checkpoints every 2 steps: the resumed run needs the saved π_old snapshot.
    extra = ("sft.loss=proximal", "sft.refresh_every=3", "train.checkpoint_every=2")
    straight = train(load_config(None, sft_overrides(chat_data, tmp_path / "a", *extra), stage="sft"))
    killed = tmp_path / "b"
    train(load_config(None, sft_overrides(chat_data, killed, *extra, "train.stop_after=5"), stage="sft"))
    resumed = train(load_config(None, sft_overrides(chat_data, killed, *extra), stage="sft"))
    assert resumed["start_step"] == 5
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        assert set(ra) == set(rb)
        for key in {"loss", "nll", "clip_frac", "grad_norm", "eval_loss", "eval_entropy"} & set(ra):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6, rel=0), (key, ra["step"])
        assert rb["tokens"] == ra["tokens"]
    assert max(r["clip_frac"] for r in a) > 0  # the clip was active
    assert straight["eval_loss"] == pytest.approx(resumed["eval_loss"], abs=1e-6)


@pytest.mark.slow
def test_two_rank_sft_matches_one_process(chat_data: dict[str, Path], tmp_path: Path) -> None:
    # Packed rows of different lengths on each rank, two micro-batches, a proximal snapshot refreshed
    # mid-run: the step's loss is normalised by the global target count, so the split does not matter.
    extra = ("sft.loss=proximal", "sft.refresh_every=2", "train.steps=4")
    single = train(load_config(None, sft_overrides(chat_data, tmp_path / "one", *extra), stage="sft"))
    config = tmp_path / "cfg.yaml"
    config.write_text("stage: sft\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "training.engine", "sft", str(config),
           *sft_overrides(chat_data, tmp_path / "two", *extra, "train.parallel=ddp", "train.device=cpu")]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in {"loss", "nll", "grad_norm", "eval_loss", "eval_entropy"} & set(ra):
            assert rb[key] == pytest.approx(ra[key], abs=1e-5, rel=0), (key, ra["step"])
        assert rb["tokens"] == ra["tokens"] and rb["clip_frac"] == pytest.approx(ra["clip_frac"], abs=1e-6)
    assert single["step"] == 4


@pytest.mark.integration
def test_refinery_train_sft_from_an_imported_hugging_face_llama(shared_data: Path, chat_tokenizer: Path,
                                                               tmp_path: Path) -> None:
    """Real instructions (Self-Instruct seed tasks) -> chat shards -> `refinery import` of a Llama folder
    -> `refinery train sft` with the shipped config: held-out loss falls, the export stops at <|end|>."""
    from pipelines.cli import main
    from training.chat import tokenize_chat
    from training.export import export_hf

    chat = tmp_path / "chat"
    tokenize_chat([shared_data / "sft" / "alpaca_seed_tasks.jsonl"], chat_tokenizer, chat, holdout=0.15,
                  progress=False)
    torch.manual_seed(0)
    export_hf(Transformer(ModelConfig.named("1m", 512, max_seq_len=256)), tmp_path / "llama")
    assert main(["import", str(tmp_path / "llama"), "-o", str(tmp_path / "imported")]) == 0
    out = tmp_path / "run"
    assert main(["-q", "train", "sft", str(REPO_ROOT / "training" / "configs" / "sft_tiny.yaml"),
                 f"data.mix={chat}", f"data.eval={chat / 'heldout'}", "data.seq_len=256",
                 f"train.init_from={tmp_path / 'imported'}", f"train.out_dir={out}", "train.steps=12",
                 "train.batch_size=8", "optim.lr=3e-3", "optim.warmup=2", "train.eval_every=12",
                 "train.eval_batches=2", "train.checkpoint_every=12"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["step"] == 0 and records[-1]["eval_loss"] < records[0]["eval_loss"] - 0.5
    assert 0 < records[-1]["eval_entropy"] < records[0]["eval_entropy"]
    hf = json.loads((out / "hf" / "config.json").read_text())
    manifest = json.loads((chat / "manifest.json").read_text())
    assert hf["eos_token_id"] == manifest["end_id"] and (out / "hf" / "tokenizer.json").is_file()
