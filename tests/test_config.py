"""Pipeline configs: typos are errors that name the key, the shipped config is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from curation.config import CurationConfig
from curation.registry import DOC_STEPS, ConfigError, build

WEB = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "web.yaml"


def test_shipped_web_config_loads() -> None:
    cfg = CurationConfig.load(WEB)
    names = [s.name for s in cfg.steps]
    assert names[0] == "extract" and "gopher_quality" in names and "pii" in names
    assert [s.name for s in cfg.dedup] == ["dedup_exact", "dedup_minhash"]
    assert cfg.format == "parquet"


def test_unknown_top_level_key_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        CurationConfig.from_dict({"stpes": []})


def test_unknown_step_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="did you mean 'gopher_quality'"):
        CurationConfig.from_dict({"steps": [{"gopher_qualty": {}}]})


def test_unknown_step_parameter_is_an_error_naming_valid_ones() -> None:
    with pytest.raises(ConfigError, match="no parameter 'timeout'"):
        build("extract", {"timeout": 3}, DOC_STEPS)


def test_bad_output_format_is_rejected() -> None:
    with pytest.raises(ConfigError, match="output.format"):
        CurationConfig.from_dict({"output": {"format": "csv"}})


def test_fingerprint_changes_with_a_threshold() -> None:
    a = CurationConfig.from_dict({"steps": [{"gopher_quality": {"min_doc_words": 50}}]})
    b = CurationConfig.from_dict({"steps": [{"gopher_quality": {"min_doc_words": 60}}]})
    assert a.fingerprint() != b.fingerprint()
