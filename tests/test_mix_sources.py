"""Pool documents read from JSON-lines files: a line that is not JSON is a counted, logged skip."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from proxy_mix.sources import read_documents


def test_lines_that_are_not_json_are_skipped_counted_and_logged(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "docs.jsonl.gz"
    lines = [json.dumps({"id": "a", "text": "first"}), '{"id": "b", "text": "cut o', "",
             json.dumps({"id": "c", "text": "third", "metadata": {"attributes": {"q": 1}}}), "not json"]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with caplog.at_level(logging.WARNING, logger="proxy_mix.sources"):
        docs = list(read_documents(path))
    assert [(d.id, d.attributes) for d in docs] == [("a", {}), ("c", {"q": 1})]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: skipped 2 lines that are not valid JSON (the first is line 2)"]


def test_a_clean_file_logs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "only"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="proxy_mix.sources"):
        assert [d.id for d in read_documents(path)] == ["a"]
    assert not caplog.records
