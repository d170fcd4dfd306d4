"""Shared fixtures: the real data set beside the checkout."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reaches ../shared/data (through the `shared_data` fixture, directly or via another
    fixture) is marked `integration` here, so the mark cannot drift from what a test reads."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, read-only. Under CI=true its absence is a failure, never a skip."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the real data set is missing at {SHARED_DATA}")
        pytest.skip(f"real data set not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train single-threaded: on 2 shared cores, OpenMP threads spinning against each other make a
    training step tens of times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shakespeare_tokens(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny-shakespeare split 90/10 into train / held-out token manifests (512-token BPE), and a long
    Gutenberg book as the long-document held-out set of mid-training. Built once per test session."""
    from curation.tokenize import tokenize_corpus
    from curation.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("shakespeare_tokens")
    text = (shared_data / "text" / "tinyshakespeare" / "input.txt").read_text()
    cut = int(len(text) * 0.9)
    for name, part in (("train", text[:cut]), ("heldout", text[cut:])):
        (root / f"{name}_txt").mkdir()
        (root / f"{name}_txt" / f"{name}.txt").write_text(part)
    (root / "long_txt").mkdir()
    book = (shared_data / "text" / "gutenberg_nltk" / "austen-persuasion.txt").read_text()
    (root / "long_txt" / "persuasion.txt").write_text(book)
    tok = train_tokenizer([root / "train_txt"], 512, root / "tokenizer" / "tokenizer.json")
    out = {}
    for name in ("train", "heldout", "long"):
        tokenize_corpus(root / f"{name}_txt", tok, root / name, suffixes=(".txt",))
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def chat_tokenizer(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 512-token BPE tokenizer.json (with the reserved role tokens <|user|>, <|assistant|>, <|end|>, ...)
    trained on a slice of tiny-shakespeare, for chat data and post-training tests."""
    from curation.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("chat_tokenizer")
    return train_tokenizer([shared_data / "text" / "tinyshakespeare" / "input.txt"], 512,
                           root / "tokenizer.json", max_chars=300_000)


@pytest.fixture(scope="session")
def arith_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The RL tests' -Zero base and SFT model on synthetic arithmetic (tests/rl_fixtures.py): built once
    per session, ~45 s on a loaded 2-core machine."""
    import torch
    from rl_fixtures import build_arith_models

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_arith_models(tmp_path_factory.mktemp("arith_models"))
    finally:
        torch.set_num_threads(before)
