"""The `hybrid` extractor: resiliparse's main content, then a line classifier (curation/extract_hybrid.py)."""

from __future__ import annotations

import json
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from curation.document import Document
from curation.extract import RESILIPARSE_OPTIONS, Extract, decode_html
from curation.extract_hybrid import (
    _MODEL,
    FEATURES,
    LineClassifier,
    hybrid_text,
    line_features,
    page_lines,
    parse_lines,
    render,
)
from curation.read.warc import WarcReader

PARAGRAPHS = [
    "The city council voted on Tuesday to rebuild the old stone bridge over the river, ending a debate "
    "that had lasted for almost ten years.",
    "Engineers had warned in 2019 that the bridge, which carries about twelve thousand cars a day, would "
    "need major repairs within five years.",
    "The new design keeps the original arches but widens the deck, adding a protected lane for bicycles "
    "and a footpath on both sides.",
    "Construction is expected to start next spring and to take about two years, during which traffic will be "
    "diverted through the northern ring road.",
    "Local shop owners said they welcomed the decision, although several asked the council to keep the works "
    "as short as possible.",
    "The mayor said the project would be paid for mostly by a regional grant, with the rest coming from the "
    "city's own infrastructure budget.",
]
BODY = "".join(f"<p>{p}</p>" for p in PARAGRAPHS)
ARTICLE = f"""<html><head><title>Council backs bridge rebuild</title></head><body>
<header><nav><ul><li><a href="/">Home</a></li><li><a href="/news">News</a></li></ul></nav></header>
<main><article>
<h1>Council votes to rebuild the old stone bridge</h1>
<div class="byline">By Anna Berger</div>
<div class="date">12 March 2024</div>
{BODY}
</article>
<section><h3>Most read</h3><ul><li><a href="/a">Storm closes schools</a></li></ul></section>
</main>
<footer><p>Copyright 2024 Riverside Gazette. All rights reserved.</p></footer>
</body></html>"""


def test_minimal_html_becomes_lines_with_their_block_element_list_depth_and_bullets() -> None:
    markup = ('<h1>T &amp; x</h1>\n\n<p>a &lt;b&gt; 3 &lt; 4 and link text<br>\nsecond line</p>\n\n<ul>\n'
              '  <li>one</li>\n  <li>two bold\n  <ol>\n    <li>sub</li>\n  </ol></li>\n</ul>\n'
              '<pre>code\n  indented</pre>\ncell1\t\tcell2\ndiv text')
    lines = parse_lines(markup)
    assert [(ln.text, ln.tag, ln.depth, ln.bullet, ln.words) for ln in lines] == [
        ("T & x", "h", 0, "", 3),
        ("a <b> 3 < 4 and link text", "p", 0, "", 8),
        ("second line", "p", 0, "", 2),
        ("one", "li", 1, "\u2022 ", 1),
        ("two bold", "li", 1, "\u2022 ", 2),
        ("sub", "li", 2, "1. ", 1),
        ("code", "pre", 0, "", 1),
        ("  indented", "pre", 0, "", 1),
        ("cell1\t\tcell2", "", 0, "", 2),
        ("div text", "", 0, "", 2),
    ]
    assert lines[1].block == lines[2].block != lines[0].block  # a <br> splits lines, not blocks
    assert render(lines) == ("T & x\n\na <b> 3 < 4 and link text\nsecond line\n\n"
                             "  \u2022 one\n  \u2022 two bold\n    1. sub\n"
                             "code\n  indented\ncell1\t\tcell2\ndiv text")


def test_lines_carry_the_same_text_as_resiliparses_plain_output() -> None:
    from resiliparse.extract.html2text import extract_plain_text

    plain = extract_plain_text(ARTICLE, **RESILIPARSE_OPTIONS)
    assert [ln.text for ln in page_lines(ARTICLE)] == [s.strip() for s in plain.splitlines() if s.strip()]


def test_article_body_is_kept_and_title_byline_date_and_teasers_are_dropped() -> None:
    text = hybrid_text(ARTICLE)
    assert text == "\n\n".join(PARAGRAPHS)  # resiliparse alone keeps all four lines below
    for boilerplate in ("Council votes", "Anna Berger", "12 March", "Most read"):
        assert boilerplate not in text


def test_page_whose_main_content_resiliparse_drops_is_extracted_from_the_whole_page() -> None:
    # resiliparse's heuristic drops elements with class names like "popup": here, the whole article.
    from resiliparse.extract.html2text import extract_plain_text

    page = ARTICLE.replace("<main>", '<main><div class="popup">').replace("</main>", "</div></main>")
    assert extract_plain_text(page, **RESILIPARSE_OPTIONS).split() == []
    text = hybrid_text(page)
    assert all(p in text for p in PARAGRAPHS)
    assert "Home" not in text.split()  # the navigation the fallback brings back is classified away


def test_pages_without_text_give_empty_text() -> None:
    assert hybrid_text("") == ""
    assert hybrid_text("<html><body><script>var x = 1;</script></body></html>") == ""


def test_model_has_one_step_per_feature_and_one_weight_per_bin() -> None:
    features = line_features(page_lines(ARTICLE))
    assert features.shape[1] == len(FEATURES) == len(_MODEL[1])
    for edges, weights in _MODEL[1]:
        assert list(edges) == sorted(edges) and len(weights) == len(edges) + 1
    with pytest.raises(ValueError, match="the model has 1 features"):
        LineClassifier((0.0, (((), (0.0,)),)))


def test_classifier_is_a_sum_of_steps() -> None:
    # bias 0.5; feature 0 adds -1 / +2 below / above 1.0 (inclusive upper edge); feature 1 adds 0.25.
    model = (0.5, (((1.0,), (-1.0, 2.0)), ((), (0.25,))) + tuple(((), (0.0,)) for _ in FEATURES[2:]))
    rows = np.zeros((3, len(FEATURES)))
    rows[:, 0] = [0.0, 1.0, 1.5]
    expected = 1 / (1 + np.exp(-np.array([-0.25, -0.25, 2.75])))
    assert np.allclose(LineClassifier(model)(rows), expected)


def test_extract_step_runs_hybrid_in_its_process_and_survives_pickling() -> None:
    step = pickle.loads(pickle.dumps(Extract(extractor="hybrid")))
    docs = [Document(id=str(i), text="", source="t", raw=ARTICLE.encode(), charset="utf-8") for i in range(3)]
    out = list(step(docs))
    step.close()
    assert [d.text for d in out] == ["\n\n".join(PARAGRAPHS)] * 3


# -- real pages -----------------------------------------------------------------------------------

_WS = re.compile(r"\s+")


def _norm(s: str) -> str:
    return _WS.sub(" ", s).strip()


@pytest.fixture(scope="module")
def evaldata_pages(shared_data: Path) -> tuple[dict[str, Document], list[tuple[str, dict[str, Any]]]]:
    pages: dict[str, Document] = {}
    for path in sorted((shared_data / "warc" / "pages").glob("*.warc.gz")):
        for doc in WarcReader().read(str(path)):
            pages.setdefault(doc.metadata["url"], doc)
    entries = []
    for key, entry in json.loads((shared_data / "extraction" / "evaldata.json").read_text()).items():
        key = key.strip()
        key = key[1:] if key.startswith("xhttp") else key
        candidates = [key] if "://" in key else [key, "https://" + key]
        entries.append((next(u for u in candidates if u in pages), entry))
    return pages, entries


@pytest.mark.integration
def test_hybrid_avoids_far_more_boilerplate_than_resiliparse_and_keeps_most_of_the_text(
    evaldata_pages: tuple[dict[str, Document], list[tuple[str, dict[str, Any]]]],
) -> None:
    pages, entries = evaldata_pages
    urls = sorted({u for u, _ in entries})
    docs = [Document(id=pages[u].id, text="", source="t", metadata=dict(pages[u].metadata), raw=pages[u].raw,
                     charset=pages[u].charset) for u in urls]
    step = Extract(extractor="hybrid")
    t0 = time.perf_counter()
    texts = {d.metadata["url"]: _norm(d.text) for d in step(docs)}
    seconds = time.perf_counter() - t0
    step.close()
    assert step.stats.errors == {} and set(step.stats.dropped) <= {"extract.empty"}
    found = sum(_norm(s) in texts.get(u, "") for u, e in entries for s in e["with"])
    avoided = sum(_norm(s) not in texts.get(u, "") for u, e in entries for s in e["without"])
    found_share = found / sum(len(e["with"]) for _, e in entries)
    avoided_share = avoided / sum(len(e["without"]) for _, e in entries)
    print(f"\nhybrid on {len(entries)} evaldata entries ({len(urls)} pages): must-have found "
          f"{found_share:.1%}, must-not avoided {avoided_share:.1%}, {len(urls) / seconds:.0f} pages/s "
          "through the Extract step")
    # Measured 93.6% / 85.5% (2026-11-29); resiliparse: 95.3% / 74.3%. Floors a little under.
    assert found_share >= 0.925
    assert avoided_share >= 0.84


@pytest.mark.integration
def test_hybrid_text_has_no_markup_left_on_real_pages(
    evaldata_pages: tuple[dict[str, Document], list[tuple[str, dict[str, Any]]]],
) -> None:
    pages, _ = evaldata_pages
    leftovers = re.compile(r"</?(p|h[1-6]|li|ul|ol|pre|br)>|&(amp|lt|gt|quot);")
    for url in sorted(pages)[::10]:
        doc = pages[url]
        text = hybrid_text(decode_html(doc.raw or b"", doc.charset))
        assert not leftovers.search(text), (url, leftovers.search(text))


# -- the public benchmarks, when present (never in the repository: see benchmarks/extraction.py) ----

BENCH_DIR = Path(os.environ.get("REFINERY_EXTRACT_BENCH", "/tmp/extract_bench"))


@pytest.mark.skipif(not (BENCH_DIR / "scrapinghub" / "ground-truth.json").is_file(),
                    reason="ScrapingHub's benchmark not found (set REFINERY_EXTRACT_BENCH)")
def test_scrapinghub_article_f1_reaches_the_target() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package beside tests/
    from benchmarks.extraction import load_scrapinghub, scrapinghub_scores

    pages = load_scrapinghub(BENCH_DIR / "scrapinghub")
    f1, precision, recall = scrapinghub_scores([(truth, hybrid_text(html)) for _, html, truth, _ in pages])
    print(f"\nhybrid on ScrapingHub's {len(pages)} articles: F1 {f1:.3f} (P {precision:.3f}, R {recall:.3f})")
    assert f1 >= 0.95  # measured 0.954; resiliparse 0.934, trafilatura 0.952
