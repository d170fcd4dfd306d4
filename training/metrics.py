"""Metrics as JSON lines and bits per byte (MFU lives next to the peak table in training/flops.py)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def bits_per_byte(loss_nats: float, bytes_per_token: float | None) -> float | None:
    """Per-token loss in nats to bits per UTF-8 byte: ``loss / ln 2`` bits per token spread over the
    bytes a token encodes on average. Tokenizer-independent, so runs with different vocabularies
    compare. None when the byte count is unknown."""
    if not bytes_per_token or bytes_per_token <= 0 or not math.isfinite(loss_nats):
        return None
    return loss_nats / math.log(2) / bytes_per_token


class MetricsLog:
    """Append-only ``metrics.jsonl``; on a rank other than 0 every call is a no-op."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a run killed after its last checkpoint logged steps that the
        resumed run repeats, and the log must read as one uninterrupted run."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            if rec.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{k}\n" for k in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
