"""Tokenizer training on real text, and loading foreign tokenizer.json files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from curation.tokenizer import SPECIAL_TOKENS, iter_texts, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def trained(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    text = shared_data / "text"
    return train_tokenizer([text / "tinyshakespeare" / "input.txt", text / "wikitext2" / "valid.txt"],
                           vocab_size=2000, output=out)


@pytest.mark.integration
def test_trained_tokenizer_round_trips_any_text(trained: Path, shared_data: Path) -> None:
    tok = load_tokenizer(trained)
    assert tok.vocab_size == 2000
    samples = [
        (shared_data / "text" / "gutenberg_nltk" / "austen-emma.txt").read_text()[:5000],
        "Grüße aus Köln — 東京 🚀\n\ttabs  and  spaces \r\n",
    ]
    for s in samples:
        assert tok.decode(tok.encode(s)) == s


@pytest.mark.integration
def test_trained_tokenizer_compresses_english(trained: Path, shared_data: Path) -> None:
    tok = load_tokenizer(trained)
    text = (shared_data / "text" / "gutenberg_nltk" / "austen-emma.txt").read_text()[:20000]
    # Bytes alone would be 1 token per byte; learned merges must do clearly better.
    assert len(tok.encode(text)) < 0.5 * len(text.encode())


@pytest.mark.integration
def test_special_tokens_have_documented_ids_and_config(trained: Path) -> None:
    tok = load_tokenizer(trained)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    config = json.loads(trained.with_name("tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")


@pytest.mark.integration
def test_special_token_text_inside_documents_is_not_a_special_token(trained: Path) -> None:
    tok = load_tokenizer(trained)
    assert tok.eos_id not in tok.encode("a page quoting <|eos|> literally")
    chat = load_tokenizer(trained, split_special_tokens=False)
    assert chat.encode("<|user|>") == [chat.token_to_id("<|user|>")]


def test_reads_parquet_jsonl_gz_and_txt_inputs(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "web").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["parquet one", "parquet two"]}),
                   corpus / "web" / "part-0.parquet")
    with gzip.open(corpus / "docs.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "c", "text": "dolma line"}) + "\n\n")
        f.write(json.dumps({"id": "d", "text": ""}) + "\n")
    (tmp_path / "book.txt").write_text("plain text\nsecond line\n")
    assert list(iter_texts(corpus / "web" / "part-0.parquet")) == ["parquet one", "parquet two"]
    assert list(iter_texts(corpus / "docs.jsonl.gz")) == ["dolma line"]
    assert "".join(iter_texts(tmp_path / "book.txt")) == "plain text\nsecond line\n"
    out = train_tokenizer([corpus, tmp_path / "book.txt"], vocab_size=300, output=tmp_path / "t.json",
                          min_frequency=1)
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("parquet dolma")) == "parquet dolma"


def test_too_small_vocab_and_missing_input_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer([tmp_path / "a.txt"], vocab_size=100, output=tmp_path / "t.json")
    with pytest.raises(FileNotFoundError, match="nope"):
        train_tokenizer([tmp_path / "nope"], vocab_size=500, output=tmp_path / "t.json")


def _foreign(path: Path, specials: list[str]) -> Path:
    """A small tokenizer.json in another family's style (no downloads)."""
    vocab = {t: i for i, t in enumerate(specials + ["hello", "world", "[UNK]"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_loads_llama_and_olmo_style_tokenizers_by_token_names(tmp_path: Path) -> None:
    llama3 = load_tokenizer(_foreign(tmp_path / "l3" / "tokenizer.json",
                                     ["<|begin_of_text|>", "<|end_of_text|>"]))
    assert (llama3.bos_id, llama3.eos_id) == (0, 1)
    llama2 = load_tokenizer(_foreign(tmp_path / "l2" / "tokenizer.json", ["<unk>", "<s>", "</s>"]))
    assert (llama2.bos_id, llama2.eos_id) == (1, 2)
    olmo = load_tokenizer(_foreign(tmp_path / "olmo" / "tokenizer.json", ["<|pad|>", "<|endoftext|>"]))
    assert (olmo.eos_id, olmo.bos_id, olmo.pad_id) == (1, 1, 0)
    assert olmo.encode("hello world") == [2, 3]


def test_tokenizer_config_beside_the_file_names_the_eos(tmp_path: Path) -> None:
    path = _foreign(tmp_path / "t" / "tokenizer.json", ["</s>", "<|im_end|>"])
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert load_tokenizer(path).eos_id == 1
    assert load_tokenizer(path, eos_token="</s>").eos_id == 0


def test_tokenizer_without_eos_is_a_clear_error(tmp_path: Path) -> None:
    path = _foreign(tmp_path / "t" / "tokenizer.json", ["[CLS]", "[SEP]"])
    with pytest.raises(ValueError, match="no EOS token"):
        load_tokenizer(path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.json")
