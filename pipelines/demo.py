"""`refinery demo`: the main job on sample data, stage by stage through files.

WARCs → curated corpus (local Ray) → tokenizer → token shards → a small pretraining run →
Hugging Face export → a sample generation. Each stage skips itself when its output is complete,
so rerunning the demo after an interruption resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from curation.pipeline import curate

REPO = Path(__file__).resolve().parents[1]
WEB_CONFIG = REPO / "pipelines" / "configs" / "web.yaml"
log = logging.getLogger("refinery.demo")


def default_data_dir() -> Path:
    return REPO.parent / "shared" / "data"


def run_demo(output: Path, data: Path | None = None, progress: bool = True, train_steps: int = 300) -> dict:
    data = data or default_data_dir()
    pages = data / "warc" / "pages"
    if not pages.is_dir():
        raise FileNotFoundError(f"sample WARCs not found at {pages}; pass --data PATH to the shared data folder")
    output.mkdir(parents=True, exist_ok=True)
    summary: dict = {}

    log.info("stage 1/5: curate %s on local Ray", pages)
    stats = curate(WEB_CONFIG, [str(pages / "*.warc.gz")], output / "corpus", executor="ray", progress=progress)
    summary["curate"] = {k: stats[k] for k in ("documents_read", "documents_written", "wall_seconds")}

    from pipelines.demo_training import run_training_stages

    summary.update(run_training_stages(output, data, progress=progress, train_steps=train_steps))
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("demo finished: %s", json.dumps(summary))
    return summary
