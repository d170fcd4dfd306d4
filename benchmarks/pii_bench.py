"""PII detection: our fast engine vs presidio's recognizers, speed and recall on the same inputs."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "pii_labelled.jsonl"


def recall_by_kind(detector: object) -> dict[str, float]:
    found: Counter = Counter()
    total: Counter = Counter()
    for line in FIXTURE.read_text().splitlines():
        rec = json.loads(line)
        spans = detector.detect(rec["text"])  # type: ignore[attr-defined]
        for gold in rec["spans"]:
            total[gold["kind"]] += 1
            if any(s.kind == gold["kind"] and s.start < gold["end"] and gold["start"] < s.end for s in spans):
                found[gold["kind"]] += 1
    return {k: found[k] / total[k] for k in sorted(total)}


def bench_pii(docs: list[str]) -> dict:
    from curation.pii import FastDetector, PresidioDetector

    fast, ref = FastDetector(), PresidioDetector()
    for t in docs[:20]:  # warm both: regex compiles, recognizer set-up
        fast.detect(t)
        ref.detect(t)
    fast = FastDetector()
    t_fast = t_ref = 0.0
    for i in range(0, len(docs), 100):  # interleave chunks so machine noise hits both alike
        chunk = docs[i:i + 100]
        t0 = time.perf_counter()
        for t in chunk:
            fast.detect(t)
        t_fast += time.perf_counter() - t0
        t0 = time.perf_counter()
        for t in chunk:
            ref.detect(t)
        t_ref += time.perf_counter() - t0
    chars = sum(map(len, docs))
    out = {"docs": len(docs), "chars": chars, "fast_chars_per_s": chars / t_fast,
           "presidio_chars_per_s": chars / t_ref, "ratio": t_ref / t_fast,
           "recall_fast": recall_by_kind(FastDetector()), "recall_presidio": recall_by_kind(ref)}
    print(f"pii: fast {out['fast_chars_per_s'] / 1e6:.2f}M chars/s, presidio "
          f"{out['presidio_chars_per_s'] / 1e6:.3f}M → {out['ratio']:.1f}×; recall fast {out['recall_fast']} "
          f"presidio {out['recall_presidio']}")
    return out
