"""One proxy run: train a small model on one mixture for a fixed token budget, then evaluate it.

The trainer is used through its public API only (`training.config.config_from_dict`,
`training.loop.train`, `training.checkpoint.load_transformer`, `training.data.eval_batches`), so a
proxy is exactly a `refinery train pretrain` run. The result (losses and bits per byte per target
set, the mixture's realized token shares) is written to `result.json` in the proxy's folder before
the function returns, so a sweep killed a moment later still counts this proxy as finished.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"


def steps_for(tokens: int, batch_size: int, seq_len: int) -> int:
    """Optimizer steps that consume `tokens` training tokens (rounded up, at least 2)."""
    return max(2, math.ceil(tokens / (batch_size * seq_len)))


def realized_shares(mix: str | Path, seq_len: int, batch_size: int, steps: int, seed: int) -> dict[str, float]:
    """Each pool's share of the rows the trainer's loader will give in `steps` steps (the loader's own plan)."""
    from training.data import MixtureLoader

    loader = MixtureLoader(mix, seq_len=seq_len, global_batch_size=batch_size, seed=seed)
    counts = [0] * len(loader.names)
    for _ in range(steps):
        rows = loader.plan()
        if rows is None:
            break
        for pool, _w in rows:
            counts[pool] += 1
            loader.consumed[pool] += 1
        loader.step += 1
    total = max(sum(counts), 1)
    return {n: c / total for n, c in zip(loader.names, counts, strict=True)}


def model_fields(model: str | dict[str, int]) -> dict[str, Any]:
    """The trainer's `model` section for a named size (`1m`) or explicit dims."""
    return {"size": model} if isinstance(model, str) else dict(model)


def write_result(folder: Path, result: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{RESULT_FILE}"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, folder / RESULT_FILE)


def read_result(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None


def train_proxy(task: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one run described by `task` (see `proxy_task`); returns the result written."""
    import torch

    from training.checkpoint import load_transformer
    from training.config import config_from_dict
    from training.data import bytes_per_token, eval_batches
    from training.loop import evaluate, train
    from training.metrics import bits_per_byte

    t0 = time.perf_counter()
    folder = Path(task["dir"])
    run_dir = folder / "run"
    torch.set_num_threads(int(task["threads"]))
    steps = steps_for(task["tokens"], task["batch_size"], task["seq_len"])
    cfg = config_from_dict({
        "stage": "pretrain",
        "model": {**model_fields(task["model"]), "max_seq_len": task["seq_len"]},
        "data": {"mix": task["mix"], "eval": None, "seq_len": task["seq_len"]},
        "optim": {"lr": task["lr"], "warmup": max(1, steps // 20), "schedule": "cosine", "min_lr_ratio": 0.1},
        "train": {"steps": steps, "batch_size": task["batch_size"], "seed": task["seed"], "log_every": 50,
                  "checkpoint_every": 0, "keep_checkpoints": 1, "out_dir": str(run_dir), "export_hf": False,
                  "progress": False, "device": task["device"]},
    })
    summary = train(cfg)
    device = torch.device(task["device"])
    model = load_transformer(run_dir, device=device)
    losses: dict[str, float] = {}
    bpb: dict[str, float | None] = {}
    for target in task["targets"]:
        batches = list(eval_batches(target["manifest"], seq_len=task["seq_len"], batch_size=task["batch_size"],
                                    max_batches=task["eval_batches"], vocab_size=model.cfg.vocab_size))
        loss = evaluate(model, batches, device, "fp32")
        losses[target["name"]] = loss
        bpb[target["name"]] = bits_per_byte(loss, bytes_per_token(target["manifest"]))
    if not task.get("keep_checkpoints"):
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    result = {
        "id": task["id"], "status": "ok", "weights": task["weights"],
        "realized": realized_shares(task["mix"], task["seq_len"], task["batch_size"], steps, task["seed"]),
        "loss": losses, "bpb": bpb, "train_loss": summary["loss"], "tokens": summary["tokens"], "steps": steps,
        "params": summary["params"], "model": task["model"], "seconds": round(time.perf_counter() - t0, 2),
        "attempt": task.get("attempt", 1),
    }
    write_result(folder, result)
    return result
