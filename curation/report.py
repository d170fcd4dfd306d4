"""Human-readable run report: a per-step table, a funnel chart and the language mix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from curation.writer import atomic_write_text


def write_report(stats: dict[str, Any], output: Path) -> Path:
    funnel_png = _funnel_chart(stats, output / "funnel.png")
    lines = [
        f"# Curation report: {stats['name']}",
        "",
        f"{stats['input_files']} input files, {stats['documents_read']:,} documents read, "
        f"{stats['documents_written']:,} written ({stats['characters_written']:,} characters), "
        f"{stats['wall_seconds']} s wall on the {stats['executor']} executor.",
        "",
        "| step | docs in | docs out | kept % | seconds | drops by reason | errors |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for s in stats["steps"]:
        kept = 100.0 * s["docs_out"] / s["docs_in"] if s["docs_in"] else 100.0
        drops = ", ".join(f"{k} {v:,}" for k, v in sorted(s["dropped"].items(), key=lambda kv: -kv[1]))
        errors = ", ".join(f"{k} {v:,}" for k, v in s.get("errors", {}).items())
        lines.append(f"| {s['name']} | {s['docs_in']:,} | {s['docs_out']:,} | {kept:.1f} | {s['seconds']:.2f} "
                     f"| {drops or '-'} | {errors or '-'} |")
    counters = [(s["name"], s["counters"]) for s in stats["steps"] if s.get("counters")]
    if counters:
        lines += ["", "## Counters by step", ""]
        lines += [f"- {name}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(c.items())) for name, c in counters]
    if stats.get("inputs_unavailable"):
        lines += ["", f"**{len(stats['inputs_unavailable'])} inputs could not be opened** (rerun the same "
                  "command to retry them): " + ", ".join(stats["inputs_unavailable"])]
    if "rejected_files" in stats:
        kept = sum(f["documents"] for f in stats["rejected_files"])
        lines += ["", f"**{kept:,} dropped documents were kept** in `rejected/` ({len(stats['rejected_files'])} "
                  "files, listed in stats.json's `rejected_files`): each names its step and reason in "
                  "`metadata.rejected` and keeps the scores computed up to the drop in `metadata.attributes`."]
    if funnel_png:
        lines += ["", f"![funnel]({funnel_png.name})"]
    folders: dict[str, list[int]] = {}
    for f in stats.get("files", []):
        folder = folders.setdefault(f["path"].rsplit("/", 1)[0], [0, 0])
        folder[0] += 1
        folder[1] += f["documents"]
    if folders:
        lines += ["", "## Written files by folder", "", "| folder | files | documents |", "|---|---:|---:|"]
        lines += [f"| `{name}/` | {n:,} | {docs:,} |" for name, (n, docs) in sorted(folders.items())]
    lines += ["", "## Language mix of the written corpus", "", "| language | documents | share |", "|---|---:|---:|"]
    total = max(1, stats["documents_written"])
    for lang, n in stats["languages"].items():
        lines.append(f"| {lang} | {n:,} | {100.0 * n / total:.1f}% |")
    samples = [x for s in stats["steps"] for x in s.get("samples", [])]
    if samples:
        lines += ["", "## First errors", ""]
        lines += [f"- `{x.get('kind')}`: " + ", ".join(f"{k}={v}" for k, v in x.items() if k != "kind")
                  for x in samples[:20]]
    path = output / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _funnel_chart(stats: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [s["name"] for s in stats["steps"]]
    counts = [s["docs_out"] for s in stats["steps"]]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    ax.barh(names[::-1], counts[::-1], color="#4C72B0")
    for y, c in enumerate(counts[::-1]):
        ax.text(c, y, f" {c:,}", va="center", fontsize=8)
    ax.set_xlabel("documents remaining after step")
    ax.set_title(f"Curation funnel: {stats['name']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
