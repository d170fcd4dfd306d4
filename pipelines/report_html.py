"""The run report: OUTPUT/report.html (one self-contained file: PNG charts embedded as base64, no
script, no external request) and OUTPUT/report.md (the same sections, charts in OUTPUT/report_files/).

Sections, each read from the files the stages wrote (a stage that did not run leaves a note instead):
the stage table (wall time, figures), the curation funnel with drops by reason, the language mix before
the language filter and the topic mix after curation, the duplicate clusters, the quality-score
distribution with the pools' bucket edges, the mixture (natural, searched, upsampled weights) and how
well the proxy regression predicts held-out proxies, the loss curve of every training stage, the RL
reward curve, sample generations after each stage for the same prompts, and the data-quality ablation.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAINING_STAGES = ("pretrain", "midtrain", "sft", "dpo", "grpo")
FILES_DIR = "report_files"
FLOOR = 1e-6  # quality scores below this share the histogram's first bin
COLORS = {"natural": "#8C8C8C", "searched": "#4C72B0", "upsampled": "#DD8452", "raw": "#C44E52",
          "curated": "#4C72B0", "mixed": "#55A868"}


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)  # paragraphs (plain text)
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (name, PNG bytes)
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)  # (header, rows)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    _plt().close(fig)
    return buf.getvalue()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def load_summaries(out: Path) -> dict[str, dict[str, Any]]:
    """Each finished stage's summary, from its marker in OUTPUT/.run/."""
    from pipelines.run import STAGE_NAMES, read_marker

    result = {}
    for name in STAGE_NAMES:
        m = read_marker(out, name)
        if m and m.get("status") == "done":
            result[name] = {**(m.get("summary") or {}), "_seconds": m.get("seconds"),
                            "_cpu_seconds": m.get("cpu_seconds")}
    return result


# ------------------------------------------------------------------------------------------------ sections

def stages_section(summaries: dict[str, dict[str, Any]]) -> Section:
    from pipelines.run import STAGE_NAMES, stage_figures

    rows = [[name, _f(s.get("_seconds"), 1), _f(s.get("_cpu_seconds"), 1), stage_figures(name, s)]
            for name in STAGE_NAMES if (s := summaries.get(name)) is not None]
    sec = Section("Stages")
    if not rows:
        sec.text.append("No stage has finished yet.")
        return sec
    total = sum(s.get("_seconds") or 0 for s in summaries.values())
    sec.text.append(f"{len(rows)} stages, {total:,.0f} s of stage wall time in all (the time each stage took when "
                    "it last ran; CPU seconds count this process and its waited-for children, not Ray workers).")
    sec.tables.append((["stage", "wall s", "CPU s", "figures"], rows))
    return sec


def curation_sections(out: Path) -> list[Section]:
    corpus = out / "curate" / "corpus"
    stats = _read_json(corpus / "stats.json")
    funnel = Section("Curation funnel")
    if stats is None:
        funnel.text.append("The curate stage has not run.")
        return [funnel]
    steps = stats["steps"]
    funnel.text.append(f"{stats['input_files']} input files, {stats['documents_read']:,} documents read, "
                       f"{stats['documents_written']:,} written ({stats['characters_written']:,} characters) in "
                       f"{stats['wall_seconds']} s on the {stats['executor']} executor.")
    funnel.figures.append(("funnel", _funnel_chart(steps, stats.get("name", "corpus"))))
    funnel.tables.append((["step", "docs in", "docs out", "dropped by reason"],
                          [[s["name"], f"{s['docs_in']:,}", f"{s['docs_out']:,}",
                            ", ".join(f"{k} {v:,}" for k, v in sorted(s["dropped"].items(), key=lambda kv: -kv[1]))
                            or "-"] for s in steps]))
    docs = _corpus_attributes(corpus)
    mix = Section("Language and topic mix")
    languages = _languages_before_filter(steps, kept_as="kept (" + "/".join(stats.get("languages") or {}) + ")")
    topics = Counter(str(a.get("topic.label")) for a in docs if a.get("topic.label") is not None)
    if languages or topics:
        mix.figures.append(("languages_topics", _languages_topics_chart(languages, topics)))
    mix.text.append("Left: the language of every extracted document, from the language step's decisions (kept and "
                    "dropped). Right: the topic classifier's label of each curated document.")
    dedup = dedup_section(corpus, steps)
    quality = quality_section(out, docs)
    return [funnel, mix, dedup, quality]


def _funnel_chart(steps: list[dict[str, Any]], name: str) -> bytes:
    plt = _plt()
    names = [s["name"] for s in steps]
    counts = [s["docs_out"] for s in steps]
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(names) + 1.3))
    ax.barh(names[::-1], counts[::-1], color="#4C72B0")
    for y, (c, s) in enumerate(zip(counts[::-1], steps[::-1], strict=True)):
        top = max(s["dropped"].items(), key=lambda kv: kv[1], default=None)
        label = f" {c:,}" + (f"  (−{s['docs_in'] - c:,}: {top[0]} {top[1]:,}…)" if top else "")
        ax.text(c, y, label, va="center", fontsize=7)
    ax.set_xlim(0, max(counts + [1]) * 1.8)
    ax.set_xlabel("documents remaining after the step")
    ax.set_title(f"Curation funnel: {name}")
    return _png(fig)


def _languages_before_filter(steps: list[dict[str, Any]], kept_as: str) -> Counter:
    step = next((s for s in steps if s["name"] == "language"), None)
    if step is None:
        return Counter()
    langs: Counter = Counter()
    for reason, n in step["dropped"].items():
        langs[reason.removeprefix("language.")] += n
    kept = step["docs_out"]
    if kept:
        langs[kept_as] += kept
    return langs


def _languages_topics_chart(languages: Counter, topics: Counter) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, counts, title in ((axes[0], languages, "language of extracted documents"),
                              (axes[1], topics, "topic of curated documents")):
        items = counts.most_common(10)
        if not items:
            ax.text(0.5, 0.5, "no data", ha="center", va="center")
            ax.set_axis_off()
            continue
        labels = [k for k, _ in items][::-1]
        ax.barh(labels, [v for _, v in items][::-1], color="#55A868" if "topic" in title else "#4C72B0")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("documents")
    return _png(fig)


def _corpus_attributes(corpus: Path) -> list[dict[str, Any]]:
    """Attributes of every curated document (scores of the classify step among them)."""
    from curation.corpus import CorpusError, curated_files
    from proxy_mix.sources import DOC_SUFFIXES, read_documents

    try:
        files = curated_files(corpus, suffixes=DOC_SUFFIXES)
    except CorpusError:
        return []
    if not files:
        return []
    return [d.attributes for d in read_documents(corpus, files)]


def dedup_section(corpus: Path, steps: list[dict[str, Any]]) -> Section:
    """Clusters of duplicates: which document survived and which were dropped as its copies (the dedup
    steps' drop lists: shard, row, id, reason, duplicate_of), with their URLs."""
    import pyarrow.parquet as pq

    from curation.corpus import WORK_DIR

    sec = Section("Duplicate clusters")
    counters = {s["name"]: s.get("counters", {}) for s in steps if s["name"].startswith("dedup")}
    dropped = {s["name"]: sum(s["dropped"].values()) for s in steps if s["name"].startswith("dedup")}
    if not counters:
        sec.text.append("The curation config has no dedup step.")
        return sec
    sec.text.append("; ".join(
        f"{name}: {dropped[name]:,} dropped" + "".join(
            f", {k.split('.', 1)[1].replace('_', ' ')} {v:,}" for k, v in sorted(c.items())
            if k.endswith(("groups", "clusters", "candidate_pairs", "verified_pairs")))
        for name, c in counters.items()))
    clusters: dict[tuple[str, str], list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for step in counters:  # in the config's order: a copy the first step dropped is not listed again
        for drops in sorted((corpus / WORK_DIR / "dedup" / step / "drops").glob("*.parquet")):
            for row in pq.read_table(drops).to_pylist():
                if row["id"] in seen:
                    continue
                seen.add(row["id"])
                clusters.setdefault((row.get("duplicate_of") or "?", row["reason"]), []).append(row)
    if not clusters:
        sec.text.append("No duplicate clusters were found.")
        return sec
    urls = _urls_of(clusters)
    rows = []
    for (survivor, reason), members in sorted(clusters.items(), key=lambda kv: -len(kv[1]))[:20]:
        rows.append([reason, urls.get(survivor, survivor), str(len(members)),
                     "; ".join(urls.get(m["id"], m["id"]) for m in members[:3]) + (" …" if len(members) > 3 else "")])
    sec.tables.append((["reason", "kept document", "copies dropped", "dropped copies"], rows))
    return sec


def _urls_of(clusters: dict[tuple[str, str], list[dict[str, Any]]]) -> dict[str, str]:
    """id → URL, from the shards the drop lists point into (the curation's own phase-1 files)."""
    import pyarrow.parquet as pq

    wanted = {k[0] for k in clusters} | {m["id"] for ms in clusters.values() for m in ms}
    shards = {m["shard"] for ms in clusters.values() for m in ms}
    urls: dict[str, str] = {}
    for shard in sorted(shards):
        try:
            table = pq.read_table(shard, columns=["id", "metadata"])
        except (OSError, ValueError, KeyError):
            continue
        for rid, meta in zip(table.column("id").to_pylist(), table.column("metadata").to_pylist(), strict=True):
            if rid in wanted and rid not in urls:
                try:
                    urls[rid] = (json.loads(meta) if isinstance(meta, str) else meta or {}).get("url") or rid
                except ValueError:
                    urls[rid] = rid
    return urls


def quality_section(out: Path, docs: list[dict[str, Any]]) -> Section:
    import numpy as np

    sec = Section("Quality-score distribution")
    scores = [(float(a["quality.score"]), str(a.get("topic.label"))) for a in docs
              if isinstance(a.get("quality.score"), int | float)]
    if not scores:
        sec.text.append("No document carries a quality.score (the curation had no classify step).")
        return sec
    pools = _read_json(out / "mix" / "pools" / "pools.json") or {}
    web = pools.get("web") or {}
    edges = web.get("edges") or {}
    topic_of = {}
    mix_cfg = _read_json_yaml(out / "mix" / "mix.yaml")
    for topic, labels in ((mix_cfg or {}).get("web", {}).get("topics") or {}).items():
        for lab in labels:
            topic_of[lab] = topic
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.4))
    groups: dict[str, list[float]] = {}
    for q, lab in scores:
        groups.setdefault(topic_of.get(lab, lab), []).append(max(q, FLOOR))
    # Log-spaced bins: a classifier trained on reference against web text puts most web pages near 0.
    ax.hist(list(groups.values()), bins=np.logspace(np.log10(FLOOR), 0, 25), stacked=True, label=list(groups))
    ax.set_xscale("log")
    names = list(groups)
    for topic, cut in sorted(edges.items()):
        color = f"C{names.index(topic)}" if topic in names else "black"
        for e in cut:
            ax.axvline(max(e, FLOOR), color=color, ls="--", lw=1.5)
    ax.set_xlabel(f"quality.score = P(high quality) (log scale; below {FLOOR:g} drawn at {FLOOR:g})")
    ax.set_ylabel("documents")
    ax.legend(fontsize=8, title="pool topic", title_fontsize=8)
    ax.set_title("Curated documents by quality score (dashed: each topic's bucket edges)")
    sec.figures.append(("quality", _png(fig)))
    qs = sorted(q for q, _ in scores)
    sec.text.append(f"{len(qs):,} documents; median score {qs[len(qs) // 2]:.2g}. The classifier was trained on "
                    "reference and instruction text (positive) against raw web text (negative); the mix cuts each "
                    "topic at its own quantiles of these scores into quality buckets.")
    return sec


def _read_json_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def mixture_section(out: Path, summaries: dict[str, dict[str, Any]]) -> Section:
    sec = Section("Data mixture")
    fit = _read_json(out / "mix" / "fit" / "report.json")
    if fit is None:
        sec.text.append("The mix stage has not run.")
        return sec
    weights = dict(fit["weights"])
    upsampled = (summaries.get("mix") or {}).get("weights", {}).get("upsampled")
    if upsampled:
        weights["upsampled"] = upsampled
    pools = fit["pools"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(pools) + 1.5))
    kinds = [k for k in ("natural", "searched", "upsampled") if k in weights]
    h = 0.8 / len(kinds)
    for i, k in enumerate(kinds):
        ax.barh([j + i * h for j in range(len(pools))], [weights[k].get(p, 0.0) for p in pools], height=h, label=k,
                color=COLORS[k])
    ax.set_yticks([j + h * (len(kinds) - 1) / 2 for j in range(len(pools))], pools)
    ax.invert_yaxis()
    ax.set_xlabel("share of training tokens")
    ax.legend()
    ax.set_title("Mixture weights per pool")
    sec.figures.append(("mixture", _png(fig)))
    s = fit["summary"]
    sec.text.append(f"{s['proxies']} proxies; regression chosen by k-fold Spearman: {s['chosen_model']} "
                    f"(Spearman " + ", ".join(f"{m} {_f(v)}" for m, v in s["kfold_spearman"].items()) + "). "
                    "Predicted objective (mean bits per byte): "
                    + ", ".join(f"{k} {v}" for k, v in s["predicted_bpb"].items()) + ".")
    scatter = _proxy_fit_chart(out)
    if scatter is not None:
        sec.figures.append(("proxy_fit", scatter))
    sec.tables.append((["pool", "natural", "searched", "upsampled"],
                       [[p, *(_f(weights[k].get(p, 0.0), 4) if k in weights else "-"
                              for k in ("natural", "searched", "upsampled"))] for p in pools]))
    return sec


def _proxy_fit_chart(out: Path) -> bytes | None:
    """Each proxy's measured objective against the chosen regression's out-of-fold prediction (the same
    folds as `refinery mix fit`'s k-fold score)."""
    import numpy as np

    from proxy_mix.config import load_config
    from proxy_mix.fit import make_model, training_data

    fit = _read_json(out / "mix" / "fit" / "report.json")
    results = _read_json(out / "mix" / "sweep" / "results.json")
    if fit is None or results is None or not (out / "mix" / "mix.yaml").is_file():
        return None
    cfg = load_config(out / "mix" / "mix.yaml")
    _, _, x, ys = training_data(cfg, results)
    y = np.mean([ys[t] for t in fit["summary"]["objective_targets"]], axis=0)
    n = len(y)
    k = min(cfg.fit.folds, n)
    order = np.random.default_rng(cfg.fit.seed).permutation(n)
    pred = np.empty(n)
    model = fit["summary"]["chosen_model"]
    for f in range(k):
        test = order[f::k]
        train = np.setdiff1d(order, test)
        pred[test] = make_model(model, cfg.fit.seed).fit(x[train], y[train]).predict(x[test])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.scatter(pred, y, color="#4C72B0")
    lo, hi = float(min(pred.min(), y.min())), float(max(pred.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], color="#8C8C8C", ls="--", lw=1)
    ax.set_xlabel("predicted (out of fold), bits per byte")
    ax.set_ylabel("measured, bits per byte")
    ax.set_title(f"Proxy fit ({model}), Spearman {_f(fit['summary']['kfold_spearman'][model])}", fontsize=10)
    return _png(fig)


def training_section(out: Path) -> Section:
    from training.metrics import read_metrics

    sec = Section("Loss curves")
    curves = {name: read_metrics(out / name / "metrics.jsonl") for name in TRAINING_STAGES
              if (out / name / "metrics.jsonl").is_file()}
    if not curves:
        sec.text.append("No training stage has run.")
        return sec
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(3.3 * len(curves), 3.0), squeeze=False)
    for ax, (name, records) in zip(axes[0], curves.items(), strict=True):
        train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        held = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
        if train:
            ax.plot(*zip(*train, strict=True), label="train", color="#4C72B0")
        if held:
            ax.plot(*zip(*held, strict=True), "o-", label="held-out", color="#DD8452")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss")
    sec.figures.append(("losses", _png(fig)))
    sec.text.append("Each stage's metrics.jsonl. pretrain and midtrain: next-token loss (held-out: the reference "
                    "target); sft: loss on the assistant's tokens; dpo: the DPO loss (held-out: held-out pairs); "
                    "grpo: the clipped surrogate.")
    return sec


def reward_section(out: Path, summaries: dict[str, dict[str, Any]]) -> Section:
    from training.metrics import read_metrics

    sec = Section("RL reward")
    path = out / "grpo" / "metrics.jsonl"
    if not path.is_file():
        sec.text.append("The grpo stage has not run.")
        return sec
    records = read_metrics(path)
    train = [(r["step"], r["reward"]) for r in records if r.get("reward") is not None]
    held = [(r["step"], r["eval_reward"]) for r in records if r.get("eval_reward") is not None]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    if train:
        steps, values = zip(*train, strict=True)
        ax.plot(steps, values, label="rollout reward (train prompts)", color="#4C72B0", alpha=0.35)
        window = max(1, len(values) // 10)
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, label=f"rollout reward, mean of the last {window} steps", color="#4C72B0")
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out reward", color="#DD8452")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.legend(fontsize=8)
    ax.set_title("GRPO on the verifiable task")
    sec.figures.append(("reward", _png(fig)))
    s = summaries.get("grpo") or {}
    line = (f"Held-out reward before RL {_f(s.get('initial_eval_reward'))}, after {_f(s.get('eval_reward'))}; "
            f"rollout reward first {_f(s.get('first_reward'))}, last {_f(s.get('last_reward'))}.")
    n = _eval_completions(out / "grpo" / "config.yaml")
    p = s.get("initial_eval_reward")
    if n and isinstance(p, float):
        line += (f" Each held-out reading averages {n} completions: a binomial standard error of about "
                 f"±{(max(p, 1 / n) * (1 - p) / n) ** 0.5:.3f}, so smaller changes are noise.")
    sec.text.append(line)
    return sec


def _eval_completions(config: Path) -> int | None:
    """Completions behind one held-out reward reading: eval prompts x eval_samples (the GRPO config)."""
    cfg = _read_json_yaml(config) or {}
    t, g = cfg.get("train") or {}, cfg.get("grpo") or {}
    try:
        return int(t.get("eval_batches", 20)) * int(t.get("eval_batch_size") or t.get("batch_size", 32)) * int(
            g.get("eval_samples", 1))
    except (TypeError, ValueError):
        return None


def samples_section(out: Path) -> Section:
    sec = Section("Sample generations")
    samples = {name: _read_json(out / name / "samples.json") for name in TRAINING_STAGES}
    samples = {k: v for k, v in samples.items() if v}
    if not samples:
        sec.text.append("No training stage has run.")
        return sec
    prompts = [s["prompt"] for s in next(iter(samples.values()))]
    sec.text.append("The same prompts after each stage (temperature 0.7, fixed seed): plain continuation for the "
                    "base stages, the user's turn of the chat template from sft on.")
    for i, prompt in enumerate(prompts):
        rows = [[name, s[i]["completion"] if i < len(s) else "-"] for name, s in samples.items()]
        sec.tables.append(([f"after stage — prompt: {prompt}", "completion"], rows))
    return sec


def ablation_section(out: Path) -> Section:
    sec = Section("Data-quality ablation")
    report = _read_json(out / "ablate" / "report.json")
    if report is None:
        sec.text.append("The ablate stage has not run.")
        return sec
    from pipelines.ablate import ARM_TITLES, ARMS

    plt = _plt()
    targets = report["targets"]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    w = 0.8 / len(ARMS)
    for i, arm in enumerate(ARMS):
        means = [report["table"][arm][t]["mean"] for t in targets]
        stds = [report["table"][arm][t]["std"] for t in targets]
        ax.bar([j + i * w for j in range(len(targets))], means, w, yerr=stds, capsize=3, label=ARM_TITLES[arm],
               color=COLORS[arm])
    ax.set_xticks([j + w for j in range(len(targets))], [f"held-out: {t}" for t in targets])
    ax.set_ylabel("bits per byte (lower is better)")
    lo = min(report["table"][a][t]["min"] for a in ARMS for t in targets)
    ax.set_ylim(lo * 0.9, None)
    ax.legend(fontsize=8)
    ax.set_title(f"Equal models, {report['tokens']:,} tokens each, seeds {report['seeds']}")
    sec.figures.append(("ablation", _png(fig)))
    md = (out / "ablate" / "report.md").read_text() if (out / "ablate" / "report.md").is_file() else ""
    lines = [ln for ln in md.splitlines() if ln.strip()]
    table = [ln for ln in lines if ln.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")] if table else []
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in table[2:]]
    sec.text += [ln for ln in lines if not ln.startswith("|")]
    if header:
        sec.tables.append((header, rows))
    return sec


# --------------------------------------------------------------------------------------------- rendering

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;margin:1em 0;font-size:.85em}td,th{border:1px solid #ddd;padding:.3em .6em;
vertical-align:top;text-align:left}th{background:#f5f5f5}img{max-width:100%;height:auto;display:block;margin:1em 0}
.note{color:#666}nav a{margin-right:1em}"""


def build_sections(out: Path, summaries: dict[str, dict[str, Any]]) -> list[Section]:
    return [stages_section(summaries), *curation_sections(out), mixture_section(out, summaries),
            training_section(out), reward_section(out, summaries), samples_section(out), ablation_section(out)]


def render_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>",
             "<nav>" + "".join(f"<a href=\"#s{i}\">{e(s.title)}</a>" for i, s in enumerate(sections)) + "</nav>"]
    for i, s in enumerate(sections):
        parts.append(f"<h2 id=\"s{i}\">{e(s.title)}</h2>")
        parts += [f"<p>{e(t)}</p>" for t in s.text]
        for name, png in s.figures:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<img alt=\"{e(name)}\" src=\"data:image/png;base64,{data}\">")
        for header, rows in s.tables:
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
                         + "</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_markdown(title: str, sections: list[Section], files: Path) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for t in s.text:
            lines += [t, ""]
        for name, _ in s.figures:
            lines += [f"![{name}]({files.name}/{name}.png)", ""]
        for header, rows in s.tables:
            lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            lines.append("")
    return "\n".join(lines)


def write_report(out: str | Path, summaries: dict[str, dict[str, Any]] | None = None,
                 title: str | None = None) -> dict[str, str]:
    """Write OUTPUT/report.html and OUTPUT/report.md for the run in `out`; returns their paths."""
    out = Path(out)
    summaries = summaries if summaries is not None else load_summaries(out)
    sections = build_sections(out, summaries)
    title = title or f"refinery run report: {out.name}"
    files = out / FILES_DIR
    files.mkdir(parents=True, exist_ok=True)
    for s in sections:
        for name, png in s.figures:
            (files / f"{name}.png").write_bytes(png)
    paths = {"html": out / "report.html", "markdown": out / "report.md"}
    for kind, text in (("html", render_html(title, sections)), ("markdown", render_markdown(title, sections, files))):
        tmp = paths[kind].with_name(f".tmp-{paths[kind].name}")
        tmp.write_text(text)
        os.replace(tmp, paths[kind])
    return {k: str(v) for k, v in paths.items()} | {"figures": str(sum(len(s.figures) for s in sections))}


def run_report_stage(ctx: Any) -> dict[str, Any]:
    from tqdm import tqdm

    with tqdm(total=1, desc="report", disable=not ctx.progress) as bar:
        # Every stage before this one has its done marker (with its wall time) by now.
        result = write_report(ctx.out, title=f"refinery run report: {ctx.cfg.raw.get('name', 'run')}")
        bar.update(1)
    return result
