"""The `hybrid` extractor: resiliparse's main-content extraction, then a line classifier.

resiliparse finds the main content fast but keeps what sits around an article body (titles,
bylines, captions, "related" teasers, share and newsletter lines), and its main-content heuristic
returns next to nothing on some pages. Here resiliparse renders its main content as minimal HTML
(paragraphs, headings, list items and preformatted text keep their element), each line gets a dozen
cheap features (its element and list depth, words, end punctuation, where it sits relative to the
page's run of body paragraphs, its neighbours' lengths, the page's size), and a logistic model over
binned features (a generalised additive model: one small step function per feature, `_MODEL`)
keeps the lines it scores above one half. A page whose main content has under `FALLBACK_WORDS`
words is extracted again from the same parsed tree without resiliparse's heuristic, and the
classifier alone decides.

The weights were fitted by `python benchmarks/extraction.py fit` on the 1,497 pages of the WCXB
development split (github.com/Murrough-Foley/web-content-extraction-benchmark, CC-BY-4.0), article
lines weighted 4x; the data stays outside the repository. Accuracy and speed against resiliparse and
trafilatura on held-out sets: docs/benchmarks.md, "Extraction accuracy".
"""

from __future__ import annotations

import html as _html
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

# resiliparse options as in curation.extract.RESILIPARSE_OPTIONS, but rendered as minimal HTML, so
# that lines keep their block element. (Link shares as features did not move F1 by 0.001: the
# main-content heuristic already drops link lists; rendering links costs ~25 more tags a page.)
OPTIONS: dict[str, Any] = {
    "preserve_formatting": "minimal_html",
    "main_content": True,
    "links": False,
    "list_bullets": True,
    "alt_texts": False,
    "form_fields": False,
    "noscript": False,
    "comments": False,
}

# Under this many words of main content, resiliparse's heuristic has most likely dropped the body:
# on WCXB articles 65 of 793 pages lose over 20% of their body words that way, most of them all.
FALLBACK_WORDS = 20
THRESHOLD = 0.5

TAGS = ("", "p", "h", "li", "pre")  # "" is text outside any block element (divs, tables, spans)
_TAG_CODE = {t: i for i, t in enumerate(TAGS)}
_TAG = re.compile(r"<(/?)([a-z0-9]+)[^>]*>")
_HEADINGS = frozenset(("h1", "h2", "h3", "h4", "h5", "h6"))
_END = frozenset('.!?:;"\u201d\u2019)\u00bb\u3002\uff01\uff1f')


@dataclass(slots=True)
class Line:
    """One line of resiliparse's output and where it came from."""

    text: str
    tag: str  # one of TAGS
    depth: int  # list nesting
    block: int  # index of the block element the line belongs to
    bullet: str  # "• " or "3. " on the first line of a list item, else ""
    words: int


def parse_lines(markup: str) -> list[Line]:
    """resiliparse's minimal HTML to lines, each with its block element."""
    lines: list[Line] = []
    tag = ""
    block = 0
    bullet = ""
    lists: list[list[int]] = []  # per open list: [ordered, items so far]
    # Every tag left in the markup ends a line (<a> is not rendered), so the text between two tags
    # is whole lines; resiliparse escapes '<', so text never holds a tag. split() gives text,
    # closing slash, tag name, text, ...
    parts = _TAG.split(markup)
    last = len(parts) - 1
    for i in range(0, len(parts), 3):
        text = parts[i]
        if text and not text.isspace():
            for piece in text.split("\n"):
                piece = piece.rstrip() if tag == "pre" else piece.strip()
                if piece:
                    if "&" in piece:
                        piece = _html.unescape(piece)
                    lines.append(Line(piece, tag, len(lists), block, bullet, len(piece.split())))
                    bullet = ""
        if i == last:
            break
        closing, name = parts[i + 1], parts[i + 2]
        if name == "br":
            continue
        block += 1
        if name == "p" or name == "pre":
            tag = "" if closing else name
        elif name in _HEADINGS:
            tag = "" if closing else "h"
        elif name == "li":
            tag = "" if closing else "li"
            if not closing and lists:
                lists[-1][1] += 1
                ordered, n = lists[-1]
                bullet = f"{n}. " if ordered else "\u2022 "
        elif name == "ul" or name == "ol":
            if closing and lists:
                lists.pop()
            elif not closing:
                lists.append([name == "ol", 0])
            tag = "li" if lists else ""
    return lines


# (name, number of categories; 0 for a continuous feature). The order is the column order of
# line_features and of _MODEL.
FEATURES: tuple[tuple[str, int], ...] = (
    ("tag_x_region", 15),  # tag (5) x before / inside / after the run of body paragraphs (3)
    ("body_tag_x_region", 6),  # same element and list depth as most words of the page (2) x region (3)
    ("log_words", 0),
    ("ends_with_punct", 2),
    ("short_without_punct", 2),
    ("log_anchor_distance", 0),  # lines to the nearest body paragraph
    ("log_block_words", 0),
    ("words_before_share", 0),
    ("log_prev_words", 0),
    ("log_next_words", 0),
    ("other_tag_x_body_share", 0),
    ("log_page_words", 0),
)


def line_features(lines: list[Line]) -> np.ndarray:
    """One row of FEATURES per line."""
    n = len(lines)
    cols = np.array([(ln.words, _TAG_CODE[ln.tag], ln.depth, ln.block, ln.text[-1] in _END) for ln in lines],
                    dtype=np.int64)
    words = cols[:, 0].astype(float)
    tag = cols[:, 1]
    punct = cols[:, 4].astype(bool)
    key = tag * 16 + np.minimum(cols[:, 2], 15)  # element and list depth
    key_words = np.bincount(key, weights=words)
    body_key = int(key_words.argmax())
    same = key == body_key
    total = max(float(words.sum()), 1.0)
    anchors = np.flatnonzero(same & (words >= 10) & (tag != _TAG_CODE["h"]))
    idx = np.arange(n)
    if len(anchors):
        region = (idx >= anchors[0]).astype(np.int64) + (idx > anchors[-1])
        pos = np.searchsorted(anchors, idx)
        after = anchors[np.minimum(pos, len(anchors) - 1)]
        before = anchors[np.maximum(pos - 1, 0)]
        distance = np.minimum(np.abs(after - idx), np.abs(idx - before))
    else:
        region = np.zeros(n, dtype=np.int64)
        distance = np.full(n, float(n))
    log_words = np.log1p(words)
    blocks = np.bincount(cols[:, 3], weights=words)[cols[:, 3]]
    return np.column_stack((
        tag * 3 + region,
        same * 3 + region,
        log_words,
        punct,
        (words < 4) & ~punct & (tag != _TAG_CODE["h"]),
        np.log1p(distance),
        np.log1p(blocks),
        (np.cumsum(words) - words) / total,
        np.concatenate(([0.0], log_words[:-1])),
        np.concatenate((log_words[1:], [0.0])),
        (~same) * (key_words[body_key] / total),
        np.full(n, math.log1p(total)),
    ))


# A fitted model: the bias, then per feature (upper bin edges, inclusive; one weight per bin).
Model = tuple[float, tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]]


class LineClassifier:
    """A fitted Model as arrays: the probability that a line is main text is the bias plus one
    step per feature, squashed."""

    def __init__(self, model: Model) -> None:
        self.bias = model[0]
        self.steps = [(np.asarray(edges, dtype=float), np.asarray(weights)) for edges, weights in model[1]]
        if len(self.steps) != len(FEATURES):
            raise ValueError(f"the model has {len(self.steps)} features, line_features makes {len(FEATURES)}")

    def __call__(self, features: np.ndarray) -> np.ndarray:
        score = np.full(len(features), self.bias)
        for j, (edges, weights) in enumerate(self.steps):
            score += weights[edges.searchsorted(features[:, j])]
        return 1.0 / (1.0 + np.exp(-score))


def render(lines: list[Line]) -> str:
    """Lines back to text as resiliparse formats it: blank lines around paragraphs, bulleted items."""
    out: list[str] = []
    prev: Line | None = None
    for ln in lines:
        if prev is not None:
            paragraph = ln.tag in ("p", "h") or prev.tag in ("p", "h")
            out.append("\n\n" if paragraph and ln.block != prev.block else "\n")
        out.append(f"{'  ' * ln.depth}{ln.bullet}{ln.text}" if ln.bullet else ln.text)
        prev = ln
    return "".join(out)


def page_lines(html: str) -> list[Line]:
    """The lines the classifier sees: main content, or the whole page when that is nearly empty."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    tree = HTMLTree.parse(html)
    lines = parse_lines(extract_plain_text(tree, **OPTIONS))
    if sum(ln.words for ln in lines) < FALLBACK_WORDS:
        lines = parse_lines(extract_plain_text(tree, **{**OPTIONS, "main_content": False}))
    return lines


def hybrid_text(html: str) -> str:
    """Main text of one HTML page (a str, decoded)."""
    lines = page_lines(html)
    if not lines:
        return ""
    keep = _CLASSIFIER(line_features(lines)) > THRESHOLD
    return render([ln for ln, k in zip(lines, keep, strict=True) if k])


# Fitted by `python benchmarks/extraction.py fit` (see the module docstring); paste its output here.
_MODEL: Model = (
    0.982,
    (
        (  # tag_x_region
            (0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5, 10.5, 11.5, 12.5, 13.5),
            (-1.256, -0.972, -1.879, 0.612, 0.382, 0.319, -0.052, 0.679, -0.485, -0.251, 0.828, 0.758, -0.245,
             0.031, 1.530),
        ),
        (  # body_tag_x_region
            (0.5, 1.5, 2.5, 3.5, 4.5),
            (-0.770, 0.551, 0.309, -0.423, 0.398, -0.064),
        ),
        (  # log_words
            (1.1, 1.39, 1.95, 2.57, 3.47),
            (0.092, -0.132, 0.027, -0.001, -0.182, 0.195),
        ),
        (  # ends_with_punct
            (0.5,),
            (-0.411, 0.411),
        ),
        (  # short_without_punct
            (0.5,),
            (-0.063, 0.063),
        ),
        (  # log_anchor_distance
            (0, 0.694, 1.39, 2.31),
            (0.517, -0.006, 0.048, -0.136, -0.425),
        ),
        (  # log_block_words
            (1.39, 2.08, 2.84, 3.53, 4.18),
            (-0.177, 0.046, -0.164, 0.048, 0.279, -0.033),
        ),
        (  # words_before_share
            (0.145, 0.321, 0.494, 0.672, 0.845),
            (0.370, 0.691, 0.424, 0.071, -0.294, -1.262),
        ),
        (  # log_prev_words
            (1.1, 1.39, 1.95, 2.49, 3.47),
            (-0.264, -0.379, 0.154, 0.101, 0.133, 0.256),
        ),
        (  # log_next_words
            (1.1, 1.39, 1.95, 2.57, 3.47),
            (-0.451, -0.192, 0.028, 0.120, 0.225, 0.270),
        ),
        (  # other_tag_x_body_share
            (0, 0.575, 0.75),
            (-0.089, -0.089, 0.005, 0.173),
        ),
        (  # log_page_words
            (6.84, 7.31, 7.66, 8.05, 8.44),
            (0.018, -0.062, 0.446, 0.270, 0.231, -0.904),
        ),
    ),
)

_CLASSIFIER = LineClassifier(_MODEL)
