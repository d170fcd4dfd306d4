"""Per-language settings derived from reference text, FineWeb-2's way.

FineWeb-2 derives two of its per-language settings from data rather than by hand:

- the language-ID threshold: tau = max(0.3, min(0.9, median - std)) of the confidence scores of
  the documents the classifier labels with the language (Penedo et al. 2025, section on LID);
- the Gopher stop words: the most frequent words of the language in a reference corpus (it used
  Wikipedia; the lists are in its `configs/{lang}_{script}.yml`).

We have no Wikipedia dump, so the reference is web text outside the pages we measure on (the Dolma
CommonCrawl and OSCAR samples of ../shared/data: 27 German, 29 French and 96 Spanish documents
with lid.176 score >= 0.65, 40-95k words each). On so little text one page can push a name
("Google") or a symbol ("↑") over any frequency cut, so a word must also be on spaCy's stop-word
list of the language (installed with spaCy, no download): spaCy's list only vetoes, the frequency
chooses. Its lists are too long to use whole (500+ words each: two of them are in nearly any text).

    python -m curation.filters.derive \\
        ../shared/data/web_text/dolma_cc_fixtures/CC-MAIN-20190717121559-20190717143559-00140.jsonl.gz \\
        ../shared/data/web_text/oscar_sample_annotated/oscar_data.jsonl --languages de fr es

prints the settings as YAML for `pipelines/configs/multilingual.yaml`, which holds them.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from curation.filters.words import word_splitter
from curation.text_stats import PUNCTUATION_SET

# Words at least this frequent are stop words: 0.5% gives lists of FineWeb-2's sizes for these
# languages (15-18 words; Gopher's English list has 8).
MIN_FREQUENCY = 0.005


def lid_threshold(scores: Sequence[float]) -> float:
    """FineWeb-2's language-ID threshold for one language: max(0.3, min(0.9, median - std)) of the
    scores of the documents labelled with it (population std), rounded to 3 decimals."""
    if not scores:
        raise ValueError("no document is labelled with the language: no threshold can be derived")
    spread = statistics.pstdev(scores)
    return round(max(0.3, min(0.9, statistics.median(scores) - spread)), 3)


def spacy_stop_words(lang: str) -> frozenset[str]:
    """spaCy's stop-word list for `lang` (ships with spaCy)."""
    try:
        module = importlib.import_module(f"spacy.lang.{lang}.stop_words")
    except ImportError as e:
        raise ValueError(f"spaCy has no stop-word list for {lang!r}") from e
    return frozenset(module.STOP_WORDS)


def stop_words(texts: Iterable[str], lang: str, min_frequency: float = MIN_FREQUENCY) -> list[str]:
    """The words of `lang` whose share of the words of `texts` is >= `min_frequency` and that are on
    spaCy's stop-word list, most frequent first. Words are counted as the Gopher rule sees them: the
    language's word split, symbol-only words left out, case kept."""
    split = word_splitter(lang)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w in split(text) if any(c not in PUNCTUATION_SET for c in w))
    total = sum(counts.values())
    if not total:
        raise ValueError(f"no {lang!r} words in the reference texts")
    vocabulary = spacy_stop_words(lang)
    return [w for w, n in counts.most_common() if n / total >= min_frequency and w in vocabulary]


def read_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """The `text` (or OSCAR's `content`) of every record of JSON-lines files, gzipped or not."""
    for path in map(Path, paths):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    text = record.get("text", record.get("content"))
                    if isinstance(text, str) and text:
                        yield text


def by_language(texts: Iterable[str], languages: Sequence[str]) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
    """Split texts by lid.176's top label: ({lang: texts scored >= 0.65}, {lang: every score})."""
    from curation.filters.language import LanguageFilter

    lid = LanguageFilter(languages=None)
    kept: dict[str, list[str]] = {lang: [] for lang in languages}
    scores: dict[str, list[float]] = {lang: [] for lang in languages}
    for text in texts:
        lang, score = lid.predict(text)
        if lang in kept:
            scores[lang].append(score)
            if score >= lid.min_score:
                kept[lang].append(text)
    return kept, scores


def derive(paths: Sequence[str | Path], languages: Sequence[str]) -> dict[str, dict[str, object]]:
    """{lang: {"min_score": ..., "stop_words": [...]}} from the reference files."""
    kept, scores = by_language(read_texts(paths), languages)
    return {lang: {"min_score": lid_threshold(scores[lang]), "stop_words": stop_words(kept[lang], lang)}
            for lang in languages}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="JSON-lines reference files (.jsonl or .jsonl.gz)")
    parser.add_argument("--languages", nargs="+", default=["de", "fr", "es"])
    args = parser.parse_args(argv)
    for lang, settings in derive(args.files, args.languages).items():
        words = ", ".join(json.dumps(w, ensure_ascii=False) for w in settings["stop_words"])  # type: ignore[union-attr]
        print(f"{lang}: min_score {settings['min_score']}  stop_words: [{words}]")


if __name__ == "__main__":
    main()
