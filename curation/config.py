"""The declarative curation config: one YAML file holds every step and threshold of a corpus."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from curation.registry import DEDUP_STEPS, DOC_STEPS, ConfigError, _suggest, check_params

TOP_KEYS = ("name", "source", "read", "steps", "dedup", "output")
READ_KEYS = ("statuses", "content_types", "max_payload_bytes", "cache_dir")
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
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        return cls.from_dict(raw or {}, where=str(path))


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
    """Import every step class and check its parameters now, before any work starts."""
    for spec in cfg.steps:
        check_params(spec.name, spec.params, DOC_STEPS)
    for spec in cfg.dedup:
        check_params(spec.name, spec.params, DEDUP_STEPS)
