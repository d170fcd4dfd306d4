"""Pipeline configs: typos are errors that name the key, the shipped config is valid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from curation.config import CurationConfig, check_extract_for_inputs, validate_buildable
from curation.param_types import param_error
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


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("steps:\n  - extract: {timeout_s: [5]}\n",
     r"step `extract`: parameter `timeout_s` must be a number, got list \[5\]"),
    ("steps:\n  - extract: {}\n  - language: {min_score: high}\n",
     r"step `language`: parameter `min_score` must be a number, got str 'high'"),
    ("steps:\n  - extract: {}\ndedup:\n  - dedup_minhash: {bands: \"26\"}\n",
     r"step `dedup_minhash`: parameter `bands` must be an integer, got str '26'"),
    ("steps:\n  - extract: {}\n  - c4: {filter_policy: 0}\n",
     r"step `c4`: parameter `filter_policy` must be true or false, got int 0"),
    ("read: {statuses: 200}\nsteps:\n  - extract: {}\n",
     r"read: parameter `statuses` must be a list of integers, got int 200"),
])
def test_mistyped_parameter_is_refused_at_load_naming_step_and_parameter(
        tmp_path: Path, yaml_text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CurationConfig.load(_write(tmp_path, yaml_text))


def test_language_name_instead_of_code_is_refused_with_the_code() -> None:
    cfg = CurationConfig.from_dict({"steps": [{"extract": {}}, {"language": {"languages": ["english"]}}]})
    with pytest.raises(ConfigError, match=r"step `language`: parameter `languages`: 'english' .*did you mean 'en'"):
        validate_buildable(cfg)
    # A bare string is one code, as the constructor reads it.
    validate_buildable(CurationConfig.from_dict({"steps": [{"language": {"languages": "de"}}]}))


def test_empty_config_file_is_refused(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n", "{}\n"):
        with pytest.raises(ConfigError, match="config is empty"):
            CurationConfig.load(_write(tmp_path, text))


@pytest.mark.parametrize("yaml_text", [
    "steps:\n  - extract: {}\nsteps:\n  - language: {}\n",
    "steps:\n  - extract: {timeout_s: 1, timeout_s: 2}\n",
])
def test_duplicate_yaml_key_is_refused(tmp_path: Path, yaml_text: str) -> None:
    with pytest.raises(ConfigError, match=r"line \d+, column \d+: not valid YAML: duplicate key"):
        CurationConfig.load(_write(tmp_path, yaml_text))


def test_exponent_without_a_dot_reads_as_a_number(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; a threshold written so must not be refused.
    cfg = CurationConfig.load(_write(tmp_path, "steps:\n  - extract: {timeout_s: 5e-1}\n"))
    assert cfg.steps[0].params["timeout_s"] == 0.5


def test_warc_input_without_an_extract_step_is_refused() -> None:
    cfg = CurationConfig.from_dict({"steps": [{"language": {}}]})
    with pytest.raises(ConfigError, match="no `extract` step.*add `- extract: {}`"):
        check_extract_for_inputs(cfg, ["wet/a.warc.wet.gz", "crawl/CC-MAIN-1.warc.gz"])
    check_extract_for_inputs(cfg, ["wet/a.warc.wet.gz", "s3://cc/crawl-data/CC-MAIN-2024-22/wet.paths.gz"])
    check_extract_for_inputs(CurationConfig.from_dict({"steps": [{"extract": {}}]}), ["a.warc.gz"])


def test_a_glob_or_folder_of_wet_files_needs_no_extract_step(tmp_path: Path) -> None:
    (tmp_path / "a.warc.wet.gz").write_bytes(b"")
    cfg = CurationConfig.from_dict({"steps": [{"language": {}}]})
    check_extract_for_inputs(cfg, [str(tmp_path / "*.gz"), str(tmp_path)])
    (tmp_path / "b.warc.gz").write_bytes(b"")
    with pytest.raises(ConfigError, match="b.warc.gz holds WARC/ARC"):
        check_extract_for_inputs(cfg, [str(tmp_path / "*.gz")])


@pytest.mark.parametrize(("value", "hint", "expected"), [
    (5, float, None),
    (True, float, "must be a number, got bool True"),
    ("en", Sequence[str], "must be a list of strings, got str 'en'"),
    ([[2, 0.2]], Sequence[Sequence[float]], None),
    (None, int | None, None),
    ("x", int | None, "must be an integer or null, got str 'x'"),
])
def test_param_error_reads_type_hints(value: object, hint: object, expected: str | None) -> None:
    assert param_error(value, hint) == expected


def test_a_bad_dedup_value_is_refused_at_load_not_after_every_shard(tmp_path: Path) -> None:
    text = "steps:\n  - extract: {}\ndedup:\n  - dedup_exact: {survivor: oldest}\n"
    with pytest.raises(ConfigError, match="step 'dedup_exact': survivor must be one of"):
        CurationConfig.load(_write(tmp_path, text))
