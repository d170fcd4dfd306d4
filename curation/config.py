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

from curation.partition import check_partitioning
from curation.registry import (
    DEDUP_STEPS,
    DOC_STEPS,
    READERS,
    ConfigError,
    _suggest,
    build,
    check_params,
    check_resources,
    is_known,
)
from curation.writer import FORMAT_SUFFIXES

TOP_KEYS = ("name", "source", "read", "reader", "steps", "dedup", "after_dedup", "output")
READ_KEYS = ("statuses", "content_types", "max_payload_bytes", "cache_dir", "allow_local_in_listings")
OUTPUT_KEYS = ("format", "partition_by", "buckets")
FORMATS = tuple(FORMAT_SUFFIXES)


@dataclass
class StepSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    # What one task running this step needs (`cpus`, `gpus`, `memory_gb`); never a parameter.
    resources: dict[str, float] = field(default_factory=dict)

    def to_item(self, resources: bool = True) -> dict[str, Any]:
        """The YAML form `{name: params}`, with `resources` among the params when asked for."""
        if resources and self.resources:
            return {self.name: {**self.params, "resources": dict(self.resources)}}
        return {self.name: self.params}


@dataclass
class CurationConfig:
    name: str = "corpus"
    source: str = "common-crawl"
    # The first step: one input file → Documents (`warc` unless the config names another).
    reader: StepSpec = field(default_factory=lambda: StepSpec("warc"))
    steps: list[StepSpec] = field(default_factory=list)
    dedup: list[StepSpec] = field(default_factory=list)
    # Per-document steps that see only dedup's survivors (an expensive tagger), in the write phase.
    after_dedup: list[StepSpec] = field(default_factory=list)
    output: dict[str, Any] = field(default_factory=lambda: {"format": "parquet"})

    @property
    def read(self) -> dict[str, Any]:
        """The reader's parameters (the `read:` section for the default WARC reader)."""
        return self.reader.params

    @property
    def format(self) -> str:
        return self.output.get("format", "parquet")

    def to_dict(self, resources: bool = True) -> dict[str, Any]:
        # The WARC reader without resources keeps the `read:` form, so older runs' fingerprints hold.
        if self.reader.name == "warc" and not (resources and self.reader.resources):
            reading: dict[str, Any] = {"read": self.read}
        else:
            reading = {"reader": self.reader.to_item(resources)}
        return {
            "name": self.name,
            "source": self.source,
            **reading,
            "steps": [s.to_item(resources) for s in self.steps],
            "dedup": [s.to_item(resources) for s in self.dedup],
            # Only when given, so the fingerprints of configs without it stay what they were.
            **({"after_dedup": [s.to_item(resources) for s in self.after_dedup]} if self.after_dedup else {}),
            "output": self.output,
        }

    def fingerprint(self) -> str:
        """Hash of everything that changes the output, to refuse resuming with another config.
        Resources only place tasks: a run resumed with more memory is the same run."""
        return hashlib.sha1(json.dumps(self.to_dict(resources=False), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> CurationConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping at the top level")
        _check_keys(raw, TOP_KEYS, where)
        output = {"format": "parquet", **(raw.get("output") or {})}
        _check_keys(output, OUTPUT_KEYS, f"{where}: output")
        if output["format"] not in FORMATS:
            raise ConfigError(f"{where}: output.format must be one of {FORMATS}, got {output['format']!r}")
        if problem := check_partitioning(output.get("partition_by"), output.get("buckets")):
            raise ConfigError(f"{where}: output.{problem}")
        cfg = cls(
            name=str(raw.get("name", "corpus")),
            source=str(raw.get("source", "common-crawl")),
            reader=_reader_spec(raw, where),
            steps=_specs(raw.get("steps") or [], DOC_STEPS, f"{where}: steps"),
            dedup=_specs(raw.get("dedup") or [], DEDUP_STEPS, f"{where}: dedup"),
            after_dedup=_specs(raw.get("after_dedup") or [], DOC_STEPS, f"{where}: after_dedup"),
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
    if not isinstance(items, list):
        raise ConfigError(f"{where}: expected a list of steps, each `- name: {{param: value}}`")
    return [_spec(item, table, f"{where}[{i}]") for i, item in enumerate(items)]


def _spec(item: Any, table: dict[str, str], where: str) -> StepSpec:
    """One step written `name`, or `name: {param: value, ..., resources: {...}}`."""
    if isinstance(item, str):
        name, params = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        name, params = next(iter(item.items()))
        params = params or {}
    else:
        raise ConfigError(f"{where}: write each step as `- name: {{param: value}}`")
    if not isinstance(params, dict):
        raise ConfigError(f"{where} {name}: parameters must be a mapping")
    if not isinstance(name, str) or not is_known(name, table):
        what = "reader" if table is READERS else "step"
        raise ConfigError(f"{where}: unknown {what} {name!r}{_suggest(str(name), list(table))} (one of "
                          "your own is named package.module:ClassName)")
    params = dict(params)
    resources = check_resources(params.pop("resources"), f"{where} {name}") if "resources" in params else {}
    return StepSpec(name, params, resources)


def _reader_spec(raw: dict[str, Any], where: str) -> StepSpec:
    """`reader: name` or `reader: {name: {params}}`; else the WARC reader with `read:`'s parameters."""
    if raw.get("reader") is None:
        read = raw.get("read") or {}
        if not isinstance(read, dict):
            raise ConfigError(f"{where}: read: expected a mapping of the WARC reader's parameters")
        _check_keys(read, READ_KEYS, f"{where}: read")
        return StepSpec("warc", dict(read))
    if raw.get("read"):
        raise ConfigError(f"{where}: give the reader's parameters under `reader:` only; `read:` is the "
                          "older spelling of `reader: {warc: {...}}`, so drop one of the two")
    spec = _spec(raw["reader"], READERS, f"{where}: reader")
    for key in ("source", "added"):
        if key in spec.params:
            raise ConfigError(f"{where}: reader {spec.name}: `{key}` is not a reader parameter; set `source` at "
                              "the top level (documents that carry their own keep it)")
    return spec


def validate_buildable(cfg: CurationConfig) -> None:
    """Import every step class and check its parameters' names and types now, before any work
    starts: a mistyped value must not surface as a TypeError mid-run or as every document
    dropped with an error."""
    check_params(cfg.reader.name, cfg.reader.params, READERS,
                 label="read" if cfg.reader.name == "warc" else f"reader `{cfg.reader.name}`")
    seen_language = False
    for spec in (*cfg.steps, *cfg.after_dedup):
        check_params(spec.name, spec.params, DOC_STEPS)
        per_language = [k for k in ("per_language", "languages") if k in spec.params]
        if spec.name != "language" and per_language and not seen_language and cfg.reader.name == "warc":
            # Raw web records carry no `lid.lang` until the language step sets it: every document would
            # silently get the default settings (counted `<step>.no_language`).
            raise ConfigError(f"step `{spec.name}`: `{per_language[0]}` needs a `language` step before it "
                              "(it reads the language that step detects)")
        seen_language = seen_language or spec.name == "language"
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
    empty text and be dropped, and the run would look like it worked. Readers of corpora yield text."""
    if cfg.reader.name != "warc" or any(s.name == "extract" for s in cfg.steps):
        return
    html = [p for p in _local_names(inputs) if not is_text_input(p)]
    if html:
        raise ConfigError(f"the config has no `extract` step but {html[0]} holds WARC/ARC (HTML) records; "
                          "add `- extract: {}` as the first step (only WET input needs no extraction)")
