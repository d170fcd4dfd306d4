"""The declarative curation config: one YAML file holds every step and threshold of a corpus."""

from __future__ import annotations

import glob
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from curation.param_types import param_error, param_hints
from curation.registry import DEDUP_STEPS, DOC_STEPS, ConfigError, _suggest, build, check_params

TOP_KEYS = ("name", "source", "read", "steps", "dedup", "output")
READ_KEYS = ("statuses", "content_types", "max_payload_bytes", "cache_dir", "allow_local_in_listings")
OUTPUT_KEYS = ("format",)
FORMATS = ("parquet", "dolma")


@dataclass
class StepSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class CurationConfig:
    name: str = "corpus"
    source: str = "common-crawl"
    read: dict[str, Any] = field(default_factory=dict)
    steps: list[StepSpec] = field(default_factory=list)
    dedup: list[StepSpec] = field(default_factory=list)
    output: dict[str, Any] = field(default_factory=lambda: {"format": "parquet"})

    @property
    def format(self) -> str:
        return self.output.get("format", "parquet")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "read": self.read,
            "steps": [{s.name: s.params} for s in self.steps],
            "dedup": [{s.name: s.params} for s in self.dedup],
            "output": self.output,
        }

    def fingerprint(self) -> str:
        """Hash of everything that changes the output, to refuse resuming with another config."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> CurationConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping at the top level")
        _check_keys(raw, TOP_KEYS, where)
        read = dict(raw.get("read") or {})
        _check_keys(read, READ_KEYS, f"{where}: read")
        output = {"format": "parquet", **(raw.get("output") or {})}
        _check_keys(output, OUTPUT_KEYS, f"{where}: output")
        if output["format"] not in FORMATS:
            raise ConfigError(f"{where}: output.format must be one of {FORMATS}, got {output['format']!r}")
        cfg = cls(
            name=str(raw.get("name", "corpus")),
            source=str(raw.get("source", "common-crawl")),
            read=read,
            steps=_specs(raw.get("steps") or [], DOC_STEPS, f"{where}: steps"),
            dedup=_specs(raw.get("dedup") or [], DEDUP_STEPS, f"{where}: dedup"),
            output=output,
        )
        # Exact dedup's survivor must also be MinHash's, or a cluster could lose every member.
        survivors = {s.params.get("survivor", "earliest") for s in cfg.dedup}
        if len(survivors) > 1:
            raise ConfigError(f"{where}: dedup steps must share one survivor rule, got {sorted(survivors)}")
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> CurationConfig:
        """Read, check the structure, and check every parameter's type: all before any work."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = load_yaml(path)
        if not raw:  # an empty file would run no step at all and keep raw records as documents
            raise ConfigError(f"{path}: the config is empty; list the steps to run "
                              "(see pipelines/configs/web.yaml)")
        cfg = cls.from_dict(raw, where=str(path))
        validate_buildable(cfg)
        return cfg


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently) and reads
    `1e-3` as a number, as YAML 1.2 does (YAML 1.1 wants `1.0e-3`)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first_line[key]}); keep one",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(path: Path) -> Any:
    """Parse a YAML file strictly; a syntax error or duplicate key is one ConfigError line."""
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}: line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).replace("\n", " ")
        raise ConfigError(f"{where}: not valid YAML: {problem}") from e


def _check_keys(d: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in d:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, list(allowed))}")


def _specs(items: list[Any], table: dict[str, str], where: str) -> list[StepSpec]:
    specs = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            name, params = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, params = next(iter(item.items()))
            params = params or {}
        else:
            raise ConfigError(f"{where}[{i}]: write each step as `- name: {{param: value}}`")
        if not isinstance(params, dict):
            raise ConfigError(f"{where}[{i}] {name}: parameters must be a mapping")
        if name not in table:
            raise ConfigError(f"{where}[{i}]: unknown step {name!r}{_suggest(name, list(table))}")
        specs.append(StepSpec(name, dict(params)))
    return specs


def validate_buildable(cfg: CurationConfig) -> None:
    """Import every step class and check its parameters' names and types now, before any work
    starts: a mistyped value must not surface as a TypeError mid-run or as every document
    dropped with an error."""
    from curation.read.warc import WarcReader

    hints = param_hints(WarcReader)
    for key, value in cfg.read.items():
        problem = param_error(value, hints[key]) if key in hints else None
        if problem:
            raise ConfigError(f"read: parameter `{key}` {problem}")
    for spec in cfg.steps:
        check_params(spec.name, spec.params, DOC_STEPS)
    for spec in cfg.dedup:
        # Built now, not only checked: dedup steps are cheap to build and would otherwise first
        # run their own checks (survivor rule, bands x rows) after every shard had been processed.
        build(spec.name, spec.params, DEDUP_STEPS)


def is_text_input(path: str) -> bool:
    """WET files (and WET listings) carry extracted text; WARC and ARC records carry HTML."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    return ".wet" in name or name.startswith("wet.")


def _local_names(inputs: list[str]) -> list[str]:
    """Input names as far as they can be known without reading: local globs and folders expanded
    (`data/*.gz` may hold only WET files), listings and URLs as written."""
    names: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if "://" not in item and any(c in item for c in "*?["):
            names.extend(glob.glob(str(path), recursive=True) or [item])
        elif "://" not in item and path.is_dir():
            names.extend(str(f) for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
        else:
            names.append(item)
    return names


def check_extract_for_inputs(cfg: CurationConfig, inputs: list[str]) -> None:
    """Refuse HTML inputs without an `extract` step: every record would reach the filters with
    empty text and be dropped, and the run would look like it worked."""
    if any(s.name == "extract" for s in cfg.steps):
        return
    html = [p for p in _local_names(inputs) if not is_text_input(p)]
    if html:
        raise ConfigError(f"the config has no `extract` step but {html[0]} holds WARC/ARC (HTML) records; "
                          "add `- extract: {}` as the first step (only WET input needs no extraction)")
