"""DPO: the losses equal TRL's on the same batch, the margin rises, resume is exact, the reference
log-probs are computed once."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from training.export import export_hf
from training.logprobs import sequence_logps
from training.model import ModelConfig, Transformer
from training.objectives.dpo import LOSS_TYPES, preference_loss

# Our Transformer and HF's Llama agree to ~1e-6 on float32 log-probs; the losses inherit that.
PARITY_ATOL = 1e-5
VOCAB = 97
CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                       max_seq_len=64, tie_embeddings=False)


def pair_batch(n_pairs: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """[chosen rows; rejected rows], right-padded with 0: a shared prompt per pair, then different
    responses of different lengths; `mask` marks the response tokens (the targets)."""
    g = torch.Generator().manual_seed(seed)
    rows: list[list[int]] = []
    masks: list[list[int]] = []
    prompts = [torch.randint(1, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n_pairs)]
    for _side in ("chosen", "rejected"):
        for prompt in prompts:
            response = torch.randint(1, VOCAB, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g)
            rows.append(prompt + response.tolist())
            masks.append([0] * len(prompt) + [1] * len(response))
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(m)] = torch.tensor(m)
        attention[i, :len(row)] = 1
    return {"input_ids": ids, "completion_mask": mask, "attention_mask": attention}


@pytest.fixture(scope="module")
def policy_and_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A reference model, a policy that differs from it, the policy's HF export, and one batch."""
    torch.manual_seed(0)
    reference = Transformer(tiny_config()).eval()
    policy = Transformer(tiny_config()).eval()
    policy.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_dir = export_hf(policy, tmp_path_factory.mktemp("policy_hf"))
    batch = pair_batch()
    with torch.no_grad():
        ref_logps, _ = sequence_logps(reference(batch["input_ids"]), batch["input_ids"], batch["completion_mask"])
    return {"policy": policy, "hf_dir": hf_dir, "batch": batch, "ref_logps": ref_logps}


def ours(loss_type: str, setup: dict[str, Any], beta: float, gamma: float = 0.0
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = setup["batch"]
    with torch.no_grad():
        logps, counts = sequence_logps(setup["policy"](batch["input_ids"]), batch["input_ids"],
                                       batch["completion_mask"])
    n = logps.shape[0] // 2
    ref = setup["ref_logps"]
    return preference_loss(loss_type, logps[:n], logps[n:], ref[:n], ref[n:], counts[:n], counts[n:],
                           beta=beta, gamma=gamma)


def trl_dpo_loss(loss_type: str, setup: dict[str, Any], beta: float) -> tuple[float, dict[str, list[float]]]:
    """TRL's own `DPOTrainer._compute_loss` on the HF export of the policy, with our reference
    log-probs as its precomputed ones; `self` is a stand-in holding only what that method reads."""
    from transformers import LlamaForCausalLM
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    hf = LlamaForCausalLM.from_pretrained(setup["hf_dir"]).eval()
    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    identity = lambda x: x  # noqa: E731  one process: gathers are the identity
    fake = SimpleNamespace(
        model=hf, accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity,
                                              gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    n = setup["ref_logps"].shape[0] // 2
    inputs = {**setup["batch"], "ref_chosen_logps": setup["ref_logps"][:n],
              "ref_rejected_logps": setup["ref_logps"][n:]}
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(fake, hf, inputs, False)
    return float(loss), fake._metrics["eval"]


# Every loss type both have: ours -> TRL's name.
TRL_DPO_NAMES = {"sigmoid": "sigmoid", "ipo": "ipo", "dpo_norm": "sigmoid_norm"}


@pytest.mark.parametrize("loss_type", sorted(TRL_DPO_NAMES))
def test_dpo_losses_equal_trl_dpo_trainer(policy_and_reference: dict[str, Any], loss_type: str) -> None:
    pytest.importorskip("trl")
    beta = 0.3
    losses, chosen_rewards, rejected_rewards = ours(loss_type, policy_and_reference, beta)
    trl_loss, trl_metrics = trl_dpo_loss(TRL_DPO_NAMES[loss_type], policy_and_reference, beta)
    assert abs(losses.mean().item() - trl_loss) <= PARITY_ATOL
    assert abs(losses.mean().item() - 0.6931) > 1e-3  # the policy really differs from the reference
    if loss_type != "dpo_norm":  # TRL logs summed-log-ratio rewards; dpo_norm's reward is per token
        assert abs(chosen_rewards.mean().item() - trl_metrics["rewards/chosen"][0]) <= PARITY_ATOL
        assert abs(rejected_rewards.mean().item() - trl_metrics["rewards/rejected"][0]) <= PARITY_ATOL
        margin = (chosen_rewards - rejected_rewards).mean().item()
        assert abs(margin - trl_metrics["rewards/margins"][0]) <= PARITY_ATOL
        accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
        assert accuracy == trl_metrics["rewards/accuracies"][0]


def test_simpo_loss_equals_trl_cpo_trainer(policy_and_reference: dict[str, Any]) -> None:
    """SimPO is TRL's CPOTrainer(loss_type="simpo"): average log-probs from its `get_batch_logps`
    on the HF model's logits, then its `cpo_loss`."""
    pytest.importorskip("trl")
    from transformers import LlamaForCausalLM
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    beta, gamma = 2.0, 0.7
    losses, _, _ = ours("simpo", policy_and_reference, beta, gamma)
    batch = policy_and_reference["batch"]
    hf = LlamaForCausalLM.from_pretrained(policy_and_reference["hf_dir"]).eval()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = hf(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    avg = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    n = avg.shape[0] // 2
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, _, _ = CPOTrainer.cpo_loss(fake, avg[:n], avg[n:])
    assert (losses - trl_losses).abs().max().item() <= PARITY_ATOL


def test_loss_types_match_their_equations_on_hand_values() -> None:
    """The four formulas on numbers worked by hand (independent of any model)."""
    c, r = torch.tensor([-4.0]), torch.tensor([-9.0])
    rc, rr = torch.tensor([-5.0]), torch.tensor([-7.0])
    nc, nr = torch.tensor([2]), torch.tensor([4])
    beta = 0.5
    expect = {
        "sigmoid": -torch.nn.functional.logsigmoid(torch.tensor(beta * ((-4 + 5) - (-9 + 7)))),  # h = 3
        "ipo": torch.tensor((1 / 2 - (-2) / 4 - 1 / (2 * beta)) ** 2),  # per-token h = 1, minus 1
        "dpo_norm": -torch.nn.functional.logsigmoid(torch.tensor(beta * (1 / 2 - (-2) / 4))),
        "simpo": -torch.nn.functional.logsigmoid(torch.tensor(beta * (-4 / 2 - (-9) / 4) - 0.1)),
    }
    assert set(expect) == set(LOSS_TYPES)
    for loss_type, value in expect.items():
        losses, _, _ = preference_loss(loss_type, c, r, rc, rr, nc, nr, beta=beta, gamma=0.1)
        assert losses.item() == pytest.approx(value.item(), abs=1e-6), loss_type
    with pytest.raises(ValueError, match="unknown DPO loss type"):
        preference_loss("kto", c, r, rc, rr, nc, nr, beta=beta)
    with pytest.raises(ValueError, match="needs the reference"):
        preference_loss("sigmoid", c, r, None, None, nc, nr, beta=beta)


# ------------------------------------------------------------------------------------------ training


def last_exchanges(shared_data: Path, out: Path, n: int) -> Path:
    """The first `n` HH pairs cut to their final human turn and the two answers to it (short rows:
    CPU tests), in HH's own text format."""
    rows = []
    with gzip.open(shared_data / "preference" / "harmless-base_test.jsonl.gz", "rt") as f:
        for line in f:
            pair = json.loads(line)
            rows.append({k: pair[k][pair[k].rfind("\n\nHuman:"):] for k in ("chosen", "rejected")})
            if len(rows) == n:
                break
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def dpo_data(shared_data: Path, chat_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """24 HH pairs as preference shards, and a randomly initialized start checkpoint (the SFT model a
    real run starts from: DPO's reference)."""
    from training.chat import tokenize_chat
    from training.checkpoint import write_model_checkpoint

    root = tmp_path_factory.mktemp("dpo_data")
    tokenize_chat([last_exchanges(shared_data, root / "hh.jsonl", 24)], chat_tokenizer, root / "pairs",
                  max_len=96, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=128)
    init = write_model_checkpoint(root / "init", Transformer(cfg).state_dict(), cfg.to_dict())
    return {"pairs": root / "pairs", "init": init}


def dpo_config(data: dict[str, Path], out_dir: Path, **train: Any) -> Any:
    from training.config import config_from_dict

    return config_from_dict({
        "stage": "dpo",
        "dpo": {"loss": "sigmoid", "beta": 0.5},
        "data": {"mix": str(data["pairs"]), "eval": str(data["pairs"]), "seq_len": 96},
        "optim": {"lr": 3e-3, "warmup": 2, "schedule": "constant", "weight_decay": 0.0},
        "train": {"steps": 16, "batch_size": 8, "seed": 3, "log_every": 1, "eval_batches": 3,
                  "init_from": str(data["init"]), "out_dir": str(out_dir), "progress": False,
                  "export_hf": False, **train},
    })


def metrics_by_step(out_dir: Path) -> dict[int, dict[str, Any]]:
    from training.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(out_dir / "metrics.jsonl")}


def test_dpo_margin_rises_over_training(dpo_data: dict[str, Path], tmp_path: Path, one_thread: None) -> None:
    from training.engine import train

    summary = train(dpo_config(dpo_data, tmp_path, eval_at_start=True))
    records = metrics_by_step(tmp_path)
    # At the start the policy is the reference: every implicit reward is 0, the loss log 2.
    assert summary["initial_eval_margin"] == pytest.approx(0.0, abs=1e-4)
    assert summary["initial_eval_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert records[1]["margin"] == pytest.approx(0.0, abs=1e-4)
    assert summary["eval_margin"] > 1.0
    assert summary["eval_accuracy"] > 0.9
    assert summary["eval_loss"] < 0.5
    first, last = (sum(records[s]["margin"] for s in steps) / 4 for steps in (range(1, 5), range(13, 17)))
    assert last > first + 1.0


def test_killed_dpo_run_resumes_with_the_same_losses_and_reuses_the_reference_cache(
    dpo_data: dict[str, Path], tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.objectives.dpo as dpo
    from training.engine import train

    passes: list[int] = []
    score_pairs = dpo.score_pairs

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        passes.append(kwargs.get("n_pairs", args[3]))
        return score_pairs(*args, **kwargs)

    monkeypatch.setattr(dpo, "score_pairs", counted)
    whole = train(dpo_config(dpo_data, tmp_path / "whole", steps=10, checkpoint_every=5))
    assert len(passes) == 2  # one reference pass over the training pairs, one over the eval pairs

    cut = tmp_path / "cut"
    first = train(dpo_config(dpo_data, cut, steps=10, checkpoint_every=5, stop_after=5))
    assert len(passes) == 4 and first["step"] == 5 and not first["finished"]
    cache = sorted((cut / "reference_logps").glob("*.npy"))
    assert len(cache) == 2
    stamps = [p.stat().st_mtime_ns for p in cache]
    resumed = train(dpo_config(dpo_data, cut, steps=10, checkpoint_every=5))
    assert len(passes) == 4  # the resumed run read the cached reference log-probs
    assert [p.stat().st_mtime_ns for p in cache] == stamps
    assert resumed["start_step"] == 5 and resumed["finished"]

    ours_by_step, theirs = metrics_by_step(cut), metrics_by_step(tmp_path / "whole")
    assert sorted(ours_by_step) == sorted(theirs) == list(range(1, 11))
    for step in range(1, 11):
        for key in ("loss", "margin", "chosen_reward", "rejected_reward", "accuracy"):
            assert ours_by_step[step][key] == pytest.approx(theirs[step][key], abs=1e-6), (step, key)
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-6)


@pytest.mark.parametrize("loss_type", ["ipo", "simpo"])
def test_refinery_train_dpo_runs_the_shipped_config(dpo_data: dict[str, Path], tmp_path: Path, one_thread: None,
                                                    loss_type: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`refinery train dpo training/configs/dpo_tiny.yaml ...` trains and exports a LlamaForCausalLM;
    SimPO needs no reference, so it computes no reference log-probs."""
    from transformers import LlamaForCausalLM

    from pipelines.cli import main

    out = tmp_path / "run"
    assert main(["-q", "train", "dpo", str(CONFIGS / "dpo_tiny.yaml"), f"dpo.loss={loss_type}", "dpo.beta=1.0",
                 f"data.mix={dpo_data['pairs']}", f"data.eval={dpo_data['pairs']}", "data.seq_len=96",
                 f"train.init_from={dpo_data['init']}", f"train.out_dir={out}", "train.steps=3",
                 "train.batch_size=4", "train.eval_batches=1", "train.eval_every=0", "train.checkpoint_every=0",
                 "train.progress=false", "optim.warmup=1"]) == 0
    assert "'finished': True" in capsys.readouterr().out
    records = metrics_by_step(out)
    assert {"margin", "accuracy", "chosen_reward", "rejected_reward"} <= set(records[3])
    assert (out / "reference_logps").is_dir() == (loss_type != "simpo")
    assert LlamaForCausalLM.from_pretrained(out / "hf").config.vocab_size == 512


def test_reference_cache_key_follows_data_reference_and_length(dpo_data: dict[str, Path], tmp_path: Path) -> None:
    """Any input of the reference log-probs gives a new key; `load_or_compute` computes only when its
    file is missing."""
    from training.reference import cache_key, cache_path, data_fingerprint, load_or_compute, model_fingerprint

    manifest = dpo_data["pairs"] / "manifest.json"
    torch.manual_seed(0)
    a, b = Transformer(tiny_config()), Transformer(tiny_config())
    parts = {"data": data_fingerprint(manifest), "reference": model_fingerprint(a), "seq_len": 96,
             "precision": "fp32", "pairs": 3}
    key = cache_key(**parts)
    assert model_fingerprint(a) == model_fingerprint(a) != model_fingerprint(b)
    for change in ({"reference": model_fingerprint(b)}, {"seq_len": 64}, {"precision": "bf16"}):
        assert cache_key(**{**parts, **change}) != key
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in dpo_data["pairs"].iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    assert data_fingerprint(copy / "manifest.json") == parts["data"]
    tokens = next(copy.glob("*.tokens.npy"))
    raw = bytearray(tokens.read_bytes())
    raw[-1] ^= 1  # one token changed
    tokens.write_bytes(bytes(raw))
    assert data_fingerprint(copy / "manifest.json") != parts["data"]

    path = cache_path(tmp_path / "run", "train", key)
    calls: list[int] = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.arange(6, dtype=torch.float64).view(3, 2)

    first, computed = load_or_compute(path, compute, is_main=True, broadcast=lambda x: x, metadata=parts)
    second, again = load_or_compute(path, compute, is_main=True, broadcast=lambda x: x, metadata=parts)
    assert (computed, again, len(calls)) == (True, False, 1)
    assert second.tolist() == first.tolist() == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="not a \\[pairs, 2\\] reference table"):
        load_or_compute(path, compute, is_main=True, broadcast=lambda x: x, metadata={**parts, "pairs": 4})


@pytest.mark.slow
def test_two_rank_dpo_matches_one_process(dpo_data: dict[str, Path], tmp_path: Path, one_thread: None) -> None:
    """torchrun, 2 ranks, DDP on gloo: the reference pass is split over the ranks and summed, the
    global batches are split by rows, and the run equals one process (to rounding)."""
    import os
    import subprocess
    import sys

    import numpy as np

    from training.engine import train

    single = tmp_path / "single"
    config = dpo_config(dpo_data, single, steps=4)
    config.optim.grad_accum = 2  # two micro-batches per step: DDP's no-sync path too
    train(config)

    multi = tmp_path / "multi"
    yaml_path = tmp_path / "dpo.yaml"
    yaml_path.write_text("stage: dpo\ndpo: {loss: sigmoid, beta: 0.5}\n")
    c = dpo_config(dpo_data, multi)
    overrides = [f"data.mix={c.data.mix}", f"data.eval={c.data.eval}", "data.seq_len=96", "optim.lr=3e-3",
                 "optim.warmup=2", "optim.schedule=constant", "optim.weight_decay=0", "optim.grad_accum=2",
                 "train.steps=4", "train.batch_size=8", "train.seed=3", "train.log_every=1", "train.eval_batches=3",
                 f"train.init_from={c.train.init_from}", f"train.out_dir={multi}", "train.progress=false",
                 "train.export_hf=false", "train.parallel=ddp", "train.device=cpu"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "training.engine", "dpo", str(yaml_path), *overrides],
                          cwd=CONFIGS.parents[1], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    for a, b in zip(sorted((single / "reference_logps").glob("*.npy")),
                    sorted((multi / "reference_logps").glob("*.npy")), strict=True):
        assert a.name == b.name  # the same key: same data, reference and settings
        np.testing.assert_allclose(np.load(b), np.load(a), rtol=0, atol=1e-4)
    ra, rb = metrics_by_step(single), metrics_by_step(multi)
    assert sorted(rb) == [1, 2, 3, 4]
    for step in rb:
        for key in ("loss", "margin", "accuracy", "grad_norm"):
            assert rb[step][key] == pytest.approx(ra[step][key], abs=1e-5), (step, key)
    assert rb[4]["eval_margin"] == pytest.approx(ra[4]["eval_margin"], abs=1e-5)
