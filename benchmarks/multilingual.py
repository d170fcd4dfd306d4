"""Documents kept per language on the sample pages: web.yaml against multilingual.yaml.

    python benchmarks/multilingual.py [--shards 4] [--out results.json]

Curates the ../shared/data/warc/pages shards three times in this process: with web.yaml (English
only), with multilingual.yaml (en, de, fr, es, each judged by its own settings), and with
multilingual.yaml's language step but web.yaml's English rules for every language (what the
per-language settings change). Prints the documents written per language and the language step's
drops as a Markdown table (docs/benchmarks.md, "Multilingual").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the `curation` package, not benchmarks/curation.py

from curation.config import CurationConfig  # noqa: E402
from curation.pipeline import curate  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CONFIGS = REPO / "pipelines" / "configs"
LANGUAGES = ("en", "de", "fr", "es")


def english_rules_everywhere() -> CurationConfig:
    """multilingual.yaml with every quality filter's per-language settings taken out."""
    raw = yaml.safe_load((CONFIGS / "multilingual.yaml").read_text())
    for spec in raw["steps"]:
        name, params = next(iter(spec.items()))
        if name != "language" and params:
            spec[name] = {k: v for k, v in params.items() if k not in ("per_language", "languages")}
    raw["name"] = "multilingual-english-rules"
    return CurationConfig.from_dict(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    shards = [str(p) for p in sorted((DATA / "warc" / "pages").glob("*.warc.gz"))[: args.shards]]
    runs: dict[str, Any] = {
        "web.yaml": CurationConfig.load(CONFIGS / "web.yaml"),
        "multilingual.yaml": CurationConfig.load(CONFIGS / "multilingual.yaml"),
        "multilingual LID, English rules": english_rules_everywhere(),
    }
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, cfg in runs.items():
            stats = curate(cfg, shards, Path(tmp) / cfg.name, progress=False)
            lid = next(s for s in stats["steps"] if s["name"] == "language")
            results[label] = {"kept": stats["languages"], "language_drops": lid["dropped"],
                              "read": stats["documents_read"], "written": stats["documents_written"],
                              "wall_seconds": stats["wall_seconds"]}
    print(f"{len(shards)} shards, {results['web.yaml']['read']} documents read\n")
    print("| config | " + " | ".join(LANGUAGES) + " | other | written | dropped by language ID | wall s |")
    print("|---|" + "---:|" * (len(LANGUAGES) + 4))
    for label, r in results.items():
        kept = r["kept"]
        other = sum(n for lang, n in kept.items() if lang not in LANGUAGES)
        drops = ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in sorted(r["language_drops"].items(),
                                                                          key=lambda kv: -kv[1])[:4])
        cells = " | ".join(str(kept.get(lang, 0)) for lang in LANGUAGES)
        print(f"| {label} | {cells} | {other} | {r['written']} | {drops} | {r['wall_seconds']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
