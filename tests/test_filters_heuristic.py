"""Each Gopher / C4 / FineWeb rule and each line modifier fires on a hand-written document."""

from __future__ import annotations

import pytest

from curation.document import Document
from curation.filters.c4 import C4Filter, count_sentences
from curation.filters.fineweb import FineWebFilter
from curation.filters.gopher_quality import GopherQualityFilter
from curation.filters.gopher_repetition import GopherRepetitionFilter
from curation.filters.line_modifiers import LineModifiers
from curation.step import Filter
from curation.text_stats import duplicated_ngram_chars, split_words, top_ngram_chars, view

# A clean English paragraph (> 50 words, stop words, terminal punctuation): every filter keeps it.
PROSE = (
    "The history of the river valley is long and varied. Farmers settled on the fertile banks "
    "and built small villages with stone walls. Over the centuries, the villages grew into towns "
    "that traded grain, wool and timber with the coast. Merchants travelled along the old road "
    "to sell their goods at the markets of the capital. Today the valley is known for its quiet "
    "landscape, its orchards and the ruins of a medieval castle that overlooks the water."
)
PROSE_LINES = "\n".join(s.strip() + "." for s in PROSE.split(".") if s.strip())


def doc(text: str, **meta: str) -> Document:
    return Document(id="d", text=text, source="test", metadata=dict(meta))


def decide(f: Filter, text: str) -> str | None:
    d = doc(text)
    f.annotate(d)
    return f.reject(d)


# -- words: datatrove's English spaCy split, reproduced ------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Hello, world.", ["Hello", ",", "world", "."]),
        ("don't can't I'm", ["do", "n't", "ca", "n't", "I", "'m"]),
        ("a well-known fact", ["a", "well", "-", "known", "fact"]),
        ("costs $3.50 (about 10%)", ["costs", "$", "3.50", "(", "about", "10", "%", ")"]),
        ("the U.S. and Dr. Smith", ["the", "U.S.", "and", "Dr.", "Smith"]),
        ("see https://example.com/a?b=1.", ["see", "https://example.com/a?b=1", "."]),
        ("wait... what", ["wait", "...", "what"]),
        ("COVID-19 in 2020", ["COVID-19", "in", "2020"]),
    ],
)
def test_split_words_follows_spacy_english_rules(text: str, words: list[str]) -> None:
    assert split_words(text) == words


def test_view_is_shared_per_text_and_recomputed_for_edited_text() -> None:
    assert view(PROSE) is view(PROSE)
    assert view(PROSE + " More.") is not view(PROSE)


def test_top_ngram_chars_counts_most_frequent_ngram_length_times_count() -> None:
    v = view("a b a b a b c")
    # "a b" occurs 3 times: len("a b") * 3
    assert top_ngram_chars(v, 2) == (9, 3)
    assert top_ngram_chars(view("aa b c"), 2) == (4, 1)  # all unique: the first n-gram, once


def test_duplicated_ngram_chars_skips_past_a_repeat_like_datatrove() -> None:
    # words: x y z x y z x y z ; 3-grams "xyz" repeat at 3 and 6 (each 3 chars, joined without spaces)
    v = view("x y z x y z x y z")
    assert duplicated_ngram_chars(v, 3)[0] == 6
    assert duplicated_ngram_chars(view("a b c d e f"), 3) == (0, 0)


# -- Gopher quality ------------------------------------------------------------------------


def test_gopher_quality_keeps_clean_prose() -> None:
    assert decide(GopherQualityFilter(), PROSE) is None


def test_gopher_quality_drops_short_document() -> None:
    assert decide(GopherQualityFilter(), "The cat sat on the mat with the hat.") == "gopher.gopher_short_doc"


def test_gopher_quality_drops_long_document() -> None:
    assert decide(GopherQualityFilter(max_doc_words=60), PROSE + " " + PROSE) == "gopher.gopher_long_doc"


def test_gopher_quality_drops_short_mean_word_length() -> None:
    text = " ".join(["a to of be it is"] * 12) + " the and with that have"
    assert decide(GopherQualityFilter(), text) == "gopher.gopher_below_avg_threshold"


def test_gopher_quality_drops_long_mean_word_length() -> None:
    text = " ".join(["internationalization"] * 50) + " the and"
    assert decide(GopherQualityFilter(), text) == "gopher.gopher_above_avg_threshold"


def test_gopher_quality_drops_too_many_hashes() -> None:
    text = PROSE + " " + " ".join(["#tag"] * 20)
    assert decide(GopherQualityFilter(), text) == "gopher.gopher_too_many_hashes"


def test_gopher_quality_drops_too_many_ellipses() -> None:
    text = PROSE + " " + " ".join(["more..."] * 20)
    assert decide(GopherQualityFilter(), text) == "gopher.gopher_too_many_ellipsis"


def test_gopher_quality_drops_bullet_lists() -> None:
    text = "\n".join(f"- {s.strip()}" for s in PROSE.split(".") if s.strip())
    assert decide(GopherQualityFilter(), text) == "gopher.gopher_too_many_bullets"


def test_gopher_quality_drops_lines_ending_in_ellipsis() -> None:
    lines = [s.strip() for s in PROSE.split(".") if s.strip()]
    text = "\n".join(line + ("…" if i % 2 else ".") for i, line in enumerate(lines))
    assert decide(GopherQualityFilter(), text) == "gopher.gopher_too_many_end_ellipsis"


def test_gopher_quality_drops_documents_of_numbers_and_symbols() -> None:
    text = PROSE + " " + " ".join(f"{i} = {i * 7} ;" for i in range(60))
    assert decide(GopherQualityFilter(), text) == "gopher.gopher_below_alpha_threshold"


def test_gopher_quality_drops_text_without_stop_words() -> None:
    words = "apple river stone market valley orchard castle timber merchant grain".split()
    text = " ".join(words * 6) + "."
    assert decide(GopherQualityFilter(), text) == "gopher.gopher_enough_stop_words"


def test_gopher_quality_threshold_none_disables_rule_without_rescoring() -> None:
    d = doc("The cat sat on the mat with the hat.")
    f = GopherQualityFilter()
    f.annotate(d)
    assert f.reject(d) == "gopher.gopher_short_doc"
    assert d.attributes["gopher.word_count"] == 9
    relaxed = GopherQualityFilter(min_doc_words=None)
    assert relaxed.reject(d) != "gopher.gopher_short_doc"


def test_gopher_quality_counts_drop_reasons_in_stats() -> None:
    f = GopherQualityFilter()
    kept = list(f([doc(PROSE), doc("Too short.")]))
    assert len(kept) == 1
    assert f.stats.dropped["gopher.gopher_short_doc"] == 1
    assert (f.stats.docs_in, f.stats.docs_out) == (2, 1)


# -- Gopher repetition ---------------------------------------------------------------------


def test_gopher_repetition_keeps_clean_prose() -> None:
    assert decide(GopherRepetitionFilter(), PROSE) is None


def test_gopher_repetition_drops_empty_text() -> None:
    assert decide(GopherRepetitionFilter(), "") == "gopher_rep.empty"


def test_gopher_repetition_drops_duplicate_paragraphs() -> None:
    text = "\n\n".join(["First paragraph here.", "Same paragraph.", "Same paragraph.", "Same paragraph."])
    assert decide(GopherRepetitionFilter(), text) == "gopher_rep.dup_para_frac"


def test_gopher_repetition_drops_duplicate_paragraph_characters() -> None:
    long = "This long paragraph is repeated once and carries most of the characters of the page."
    text = "\n\n".join([long, "a", "b", "c", "d", "e", long])
    assert decide(GopherRepetitionFilter(), text) == "gopher_rep.dup_para_char_frac"


def test_gopher_repetition_drops_duplicate_lines() -> None:
    text = "\n".join(["Intro line.", "Buy now!", "Buy now!", "Buy now!", "Outro line."])
    assert decide(GopherRepetitionFilter(dup_para_frac=None, dup_para_char_frac=None), text) == (
        "gopher_rep.dup_line_frac"
    )


def test_gopher_repetition_drops_duplicate_line_characters() -> None:
    long = "This long line is repeated once and carries most of the characters of the page."
    text = "\n".join([long, "a", "b", "c", "d", "e", long])
    f = GopherRepetitionFilter(dup_para_frac=None, dup_para_char_frac=None)
    assert decide(f, text) == "gopher_rep.dup_line_char_frac"


def test_gopher_repetition_drops_dominant_top_ngram() -> None:
    text = " ".join(["click here"] * 30) + " " + PROSE
    assert decide(GopherRepetitionFilter(), text) == "gopher_rep.top_2_gram"


def test_gopher_repetition_drops_duplicated_ngrams() -> None:
    sentence = "the quick brown fox jumps over the lazy dog near the river bank"
    text = PROSE + " " + " ".join([sentence] * 3)
    f = GopherRepetitionFilter(top_n_grams=())
    assert decide(f, text) == "gopher_rep.duplicated_5_n_grams"


def test_gopher_repetition_accepts_yaml_style_ngram_lists() -> None:
    f = GopherRepetitionFilter(top_n_grams=[[2, 0.5]], dup_n_grams=[[5, 0.5]])
    assert f.top_n_grams == ((2, 0.5),) and f.dup_n_grams == ((5, 0.5),)
    with pytest.raises(ValueError, match="n-gram size"):
        GopherRepetitionFilter(top_n_grams=[[0, 0.5]])


# -- C4 ------------------------------------------------------------------------------------


def run_c4(text: str, **kw: object) -> tuple[list[Document], C4Filter]:
    f = C4Filter(**kw)  # type: ignore[arg-type]
    return list(f([doc(text)])), f


def test_c4_keeps_prose_and_rewrites_only_kept_lines() -> None:
    text = "Menu\n" + PROSE_LINES + "\nShare this"
    out, f = run_c4(text)
    assert out and out[0].text == PROSE_LINES
    assert f.stats.counters["c4.line_no_terminal_punct"] == 2


def test_c4_removes_line_without_terminal_punctuation_or_with_ellipsis() -> None:
    out, f = run_c4(PROSE_LINES + "\nThis line trails off...")
    assert out[0].text == PROSE_LINES
    assert f.stats.counters["c4.line_no_terminal_punct"] == 1


def test_c4_removes_line_with_too_few_words() -> None:
    out, f = run_c4(PROSE_LINES + "\nGo now.")
    assert out[0].text == PROSE_LINES
    assert f.stats.counters["c4.line_too_few_words"] == 1


def test_c4_removes_line_with_overlong_word() -> None:
    out, f = run_c4(PROSE_LINES + "\nA " + "x" * 1001 + " word.")
    assert out[0].text == PROSE_LINES
    assert f.stats.counters["c4.line_too_long_word"] == 1


def test_c4_removes_javascript_and_policy_lines() -> None:
    text = PROSE_LINES + "\nPlease enable JavaScript to view this.\nRead our privacy policy here."
    out, f = run_c4(text)
    assert out[0].text == PROSE_LINES
    assert f.stats.counters["c4.line_javascript"] == 1
    assert f.stats.counters["c4.line_policy"] == 1


def test_c4_strips_wikipedia_citations() -> None:
    out, _ = run_c4(PROSE_LINES.replace("long and varied.", "long and varied.[1]"))
    assert "[1]" not in out[0].text and "long and varied." in out[0].text


def test_c4_drops_page_with_lorem_ipsum() -> None:
    out, f = run_c4(PROSE_LINES + "\nLorem ipsum dolor sit amet, consectetur.")
    assert not out and f.stats.dropped["c4.lorem_ipsum"] == 1


def test_c4_drops_page_with_curly_bracket() -> None:
    out, f = run_c4(PROSE_LINES + "\nThe function body is { return x; } here.")
    assert not out and f.stats.dropped["c4.curly_bracket"] == 1


def test_c4_drops_page_with_too_few_sentences() -> None:
    out, f = run_c4("One good sentence is here.\nAnother good sentence is here.")
    assert not out and f.stats.dropped["c4.too_few_sentences"] == 1


def test_c4_leaves_dropped_document_text_untouched() -> None:
    d = doc("Menu\nOne good sentence is here.")
    list(C4Filter()([d]))
    assert d.text == "Menu\nOne good sentence is here."


def test_count_sentences_splits_after_terminal_punctuation() -> None:
    assert count_sentences("One. Two! Three? Four") == 4
    assert count_sentences('He said "stop." Then he left.') == 2


# -- FineWeb -------------------------------------------------------------------------------


def test_fineweb_keeps_clean_prose() -> None:
    assert decide(FineWebFilter(), PROSE) is None


def test_fineweb_drops_empty_text() -> None:
    assert decide(FineWebFilter(), "\n  \n") == "fineweb.empty"


def test_fineweb_drops_lines_without_terminal_punctuation() -> None:
    text = "\n".join(s.strip() + " and so on and so forth for a while" for s in PROSE.split(".") if s.strip())
    assert decide(FineWebFilter(), text) == "fineweb.line_punct_ratio"


def test_fineweb_drops_mostly_short_lines() -> None:
    text = PROSE_LINES + "\n" + "\n".join(f"Item number {i}." for i in range(20))
    assert decide(FineWebFilter(), text) == "fineweb.short_line_ratio"


def test_fineweb_drops_duplicated_line_characters() -> None:
    lines = PROSE_LINES.split("\n")
    text = "\n".join(lines + lines[:1])
    assert decide(FineWebFilter(), text) == "fineweb.char_dup_ratio"


def test_fineweb_drops_list_like_text() -> None:
    text = "\n".join(f"Item {i}." for i in range(30))  # 3 words a line: 29 newlines / 90 words
    assert decide(FineWebFilter(short_line_thr=1.0, char_duplicates_ratio=1.0), text) == "fineweb.list_ratio"


# -- line modifiers ------------------------------------------------------------------------


def modify(text: str, **kw: object) -> tuple[Document | None, LineModifiers]:
    m = LineModifiers(**kw)  # type: ignore[arg-type]
    out = list(m([doc(text)]))
    return (out[0] if out else None), m


def test_line_modifiers_keep_clean_prose_unchanged() -> None:
    out, _ = modify(PROSE_LINES)
    assert out is not None and out.text == PROSE_LINES


def test_line_modifiers_collapse_blank_line_runs() -> None:
    out, _ = modify("First line of text.\n\n\n\n\nSecond line of text.")
    assert out is not None and out.text == "First line of text.\n\nSecond line of text."


def test_line_modifiers_strip_line_whitespace() -> None:
    out, _ = modify("   First line of text.   \n\tSecond line of text.")
    assert out is not None and out.text == "First line of text.\nSecond line of text."


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        ("ADD TO CART NOW", "uppercase"),
        ("1234567890", "numeric"),
        ("-----", "symbols"),
        ("3.4K views", "counter"),
        ("Home", "too_few_words"),
        ("We use cookies to improve your experience", "boilerplate"),
    ],
)
def test_line_modifiers_drop_boilerplate_line(line: str, rule: str) -> None:
    out, m = modify(PROSE_LINES + "\n" + line, max_removed_words_ratio=None)
    assert out is not None and out.text == PROSE_LINES
    assert m.stats.counters[f"line_modifiers.{rule}"] == 1


def test_line_modifiers_cut_substrings_from_short_lines() -> None:
    out, _ = modify("Your basket: 3 items in cart\nSign-in to continue reading", max_removed_words_ratio=None)
    assert out is not None and out.text == "Your basket: 3\nto continue reading"


def test_line_modifiers_trim_navigation_at_document_edges_when_enabled() -> None:
    text = "Home\nNews Sport\n" + PROSE_LINES + "\nContact us"
    out, m = modify(text, edge_max_words=3, min_words_per_line=None, max_removed_words_ratio=None)
    assert out is not None and out.text == PROSE_LINES
    assert m.stats.counters["line_modifiers.edge"] == 3


def test_line_modifiers_drop_document_that_loses_too_many_words() -> None:
    out, m = modify(PROSE_LINES + "\nHOME NEWS SPORT WEATHER TRAVEL CULTURE")
    assert out is None
    assert m.stats.dropped["line_modifiers.too_many_words_removed"] == 1


def test_line_modifiers_drop_document_left_empty() -> None:
    out, m = modify("HOME\n12345\n-----")
    assert out is None and m.stats.dropped["line_modifiers.empty"] == 1


def test_line_modifiers_reject_unknown_substring_location() -> None:
    with pytest.raises(ValueError, match="location"):
        LineModifiers(substrings=[("x", "middle")])


@pytest.mark.parametrize("make, method", [(C4Filter, "clean"), (LineModifiers, "modify")])
def test_line_rule_failure_on_one_document_is_a_counted_drop_not_a_dead_job(
    make: type, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = make()
    real = getattr(step, method)

    def flaky(d: Document):  # type: ignore[no-untyped-def]
        if d.id == "bad":
            raise RuntimeError("rule bug")
        return real(d)

    monkeypatch.setattr(step, method, flaky)
    docs = [Document(id=i, text=PROSE_LINES, source="test") for i in ("a", "bad", "c")]
    out = list(step(docs))
    assert [d.id for d in out] == ["a", "c"]
    assert step.stats.dropped[f"{step.name}.error"] == 1 and step.stats.errors[f"{step.name}.exception"] == 1
