"""The run report (pipelines/report_html.py): rendered by a real headless Chromium, every embedded chart
must decode (naturalWidth > 0) and no script error may occur; the page needs nothing outside itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.report_html import write_report
from pipelines.run import write_marker

# Injected first into a copy of the page: records every error event (a script error, or an <img> that
# fails to load: error events do not bubble, so listen in the capture phase), then on `load` writes what
# it found into the DOM, which `chromium --dump-dom` prints.
CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  window.__errors.push(String(e.message || (e.target && (e.target.src || '').slice(0, 60)) || 'error'));
}, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  var d = document.createElement('div');
  d.id = 'render-check';
  d.setAttribute('data-images', imgs.length);
  d.setAttribute('data-broken', broken);
  d.setAttribute('data-errors', window.__errors.join(' | '));
  document.body.appendChild(d);
});
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but chromium is missing (.ci/run installs it with apt-get)")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return found


def browser_check(page: Path, work: Path) -> dict[str, Any]:
    """Render `page` in headless Chromium; returns the images found, how many did not decode, and errors."""
    html = page.read_text()
    probe = work / f"probe-{page.name}"
    probe.write_text(html.replace("<head>", "<head>" + CHECK_SCRIPT, 1))
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={work / 'chromium-profile'}", "--virtual-time-budget=10000",
                           "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<div id="render-check" data-images="(\d+)" data-broken="(\d+)" data-errors="([^"]*)"',
                      proc.stdout)
    assert found, f"the page did not finish loading in chromium (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return {"images": int(found[1]), "broken": int(found[2]), "errors": found[3]}


def fake_run(out: Path) -> Path:
    """A run folder with what each stage leaves behind, small: curation stats and documents, a mixture fit,
    training metrics and samples, an ablation."""
    corpus = out / "curate" / "corpus"
    (corpus / "documents").mkdir(parents=True)
    rows = [{"id": f"d{i}", "text": f"text {i}", "metadata": json.dumps({"url": f"https://e.org/{i}", "attributes": {
        "quality.score": 10 ** (-i % 6) * 0.9, "topic.label": "cs" if i % 3 else "world"}})} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), corpus / "documents" / "part-0.parquet")
    steps = [{"name": "read", "docs_in": 100, "docs_out": 100, "dropped": {}, "counters": {}},
             {"name": "language", "docs_in": 100, "docs_out": 31, "dropped": {"language.de": 60, "language.fr": 9},
              "counters": {}},
             {"name": "dedup_exact", "docs_in": 31, "docs_out": 30, "dropped": {"dedup.exact": 1},
              "counters": {"dedup_exact.groups": 1}}]
    (corpus / "stats.json").write_text(json.dumps({
        "name": "web", "input_files": 1, "documents_read": 100, "documents_written": 30, "characters_written": 900,
        "wall_seconds": 1.0, "executor": "local", "steps": steps, "languages": {"en": 30},
        "files": [{"path": "documents/part-0.parquet", "documents": 30}]}))
    for stage, key in (("pretrain", "loss"), ("sft", "loss"), ("grpo", "reward")):
        (out / stage).mkdir(parents=True)
        records = [{"step": s, "loss": 5.0 / s, key: 0.1 * s, **({"eval_loss": 4.0 / s} if s % 2 == 0 else {})}
                   for s in range(1, 6)]
        (out / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / stage / "samples.json").write_text(json.dumps([{"prompt": "What is 2 + 3? <b>", "completion":
                                                               "2 + 3 = 5 </table><script>alert(1)</script>"}]))
    (out / "mix" / "fit").mkdir(parents=True)
    (out / "mix" / "fit" / "report.json").write_text(json.dumps({
        "pools": ["web.q0", "web.q1", "reference"],
        "weights": {k: {"web.q0": 0.2, "web.q1": 0.5, "reference": 0.3} for k in ("natural", "searched", "uniform")},
        "summary": {"proxies": 8, "chosen_model": "linear", "kfold_spearman": {"linear": 0.5},
                    "predicted_bpb": {"natural": 3.1}}}))
    (out / "ablate").mkdir()
    cell = {"mean": 3.0, "std": 0.1, "min": 2.9, "max": 3.1, "values": [2.9, 3.1]}
    (out / "ablate" / "report.json").write_text(json.dumps({
        "targets": ["reference", "web"], "seeds": [0, 1], "tokens": 1000,
        "table": {a: {"reference": cell, "web": cell} for a in ("raw", "curated", "mixed")}}))
    (out / "ablate" / "report.md").write_text("| corpus | reference |\n|---|---|\n| raw | 3.0 |\n\nraw wins.\n")
    write_marker(out, "curate", {"status": "done", "fingerprint": "x", "seconds": 1.5,
                                 "summary": {"documents_read": 100, "documents_written": 30}})
    write_marker(out, "grpo", {"status": "done", "fingerprint": "x", "seconds": 2.0,
                               "summary": {"initial_eval_reward": 0.1, "eval_reward": 0.4}})
    return out


def test_the_report_renders_in_a_headless_browser_with_every_chart(tmp_path: Path) -> None:
    paths = write_report(fake_run(tmp_path / "run"))
    page = Path(paths["html"])
    html = page.read_text()
    # Self-contained: no script, stylesheet or image fetched from anywhere; the samples' markup is escaped.
    assert "<script" not in html and "<link" not in html and 'src="http' not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    embedded = html.count('src="data:image/png;base64,')
    assert embedded == int(paths["figures"]) >= 6  # funnel, languages, quality, mixture, losses, reward, ablation
    check = browser_check(page, tmp_path)
    assert check == {"images": embedded, "broken": 0, "errors": ""}
    md = Path(paths["markdown"]).read_text()
    assert md.count("](report_files/") == embedded and "## RL reward" in md


def test_the_browser_check_catches_a_broken_image_and_a_script_error(tmp_path: Path) -> None:
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head></head><body><img src="data:image/png;base64,AAAA">'
                    "<script>undefinedFunction();</script></body></html>")
    check = browser_check(page, tmp_path)
    assert check["images"] == 1 and check["broken"] == 1
    assert "undefinedFunction" in check["errors"]


def test_a_report_of_a_run_with_nothing_done_says_what_is_missing(tmp_path: Path) -> None:
    paths = write_report(tmp_path)
    text = Path(paths["markdown"]).read_text()
    assert "The curate stage has not run." in text and "The grpo stage has not run." in text
    assert paths["figures"] == "0"
