"""What a curated corpus is to the stages that read one (tokenizer training, tokenize).

`refinery curate --output OUT` writes its documents to `OUT/documents/<source>/<shard>.<ext>` (or,
with `output.partition_by`, to nested `OUT/documents/<key>=<value>/.../<shard>.<ext>` folders) and,
last, `OUT/stats.json`, whose `files` lists every document file the run wrote. Everything under
`OUT/_work/` (phase-1 shards holding documents before dedup, dedup tables, markers) is the run's
scratch, not the corpus, and `OUT/rejected/` holds dropped documents, not the corpus. So a reader
given OUT, OUT/documents or any folder inside OUT/documents reads exactly the listed files under
that folder; a run that has not finished (no `stats.json`) is
refused rather than read half-written. A folder that is not part of a curation output is read as
plain files by the caller.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

WORK_DIR = "_work"
RUN_FILE = "run.json"
DOCUMENTS_DIR = "documents"
STATS_FILE = "stats.json"


class CorpusError(ValueError):
    """A curation output that cannot be read as a corpus (unfinished, damaged, or its work files)."""


def is_curation_output(folder: Path) -> bool:
    return (folder / WORK_DIR / RUN_FILE).is_file() or _lists_files(folder / STATS_FILE)


def _lists_files(stats: Path) -> bool:
    try:
        return stats.is_file() and "files" in json.loads(stats.read_text())
    except (OSError, ValueError):
        return False


def curation_root(path: str | Path) -> Path | None:
    """The curation output that `path` is, or whose documents folder it is in; else None.

    Pointing into the output's `_work/` is an error: those are not the corpus's documents.
    """
    path = Path(path).resolve()
    for anc in path.parents:
        if anc.name == WORK_DIR and is_curation_output(anc.parent):
            raise CorpusError(f"{path} is inside the work folder of the curation output {anc.parent}, "
                              f"not its corpus; point at {anc.parent} instead")
    # OUT, OUT/documents, or a folder at any depth inside OUT/documents (a source, a partition).
    candidates = [path]
    documents = next((anc for anc in (path, *path.parents) if anc.name == DOCUMENTS_DIR), None)
    if documents is not None:
        candidates.append(documents.parent)
    for root in candidates:
        if is_curation_output(root):
            return root
    return None


def curated_files(path: str | Path, suffixes: tuple[str, ...]) -> list[Path] | None:
    """The document files a curation run wrote under `path` (with the caller's spelling of
    `path` as their prefix), sorted; None when `path` is not part of a curation output."""
    root = curation_root(path)
    if root is None:
        return None
    stats_file = root / STATS_FILE
    if not stats_file.is_file():
        raise CorpusError(f"the curation run in {root} has not finished (no {STATS_FILE}); rerun the same "
                          "`refinery curate` command to finish it before reading the corpus")
    stats = json.loads(stats_file.read_text())
    if stats.get("files") is None:
        raise CorpusError(f"{stats_file} does not list the corpus files (written by an older refinery); rerun "
                          "the same `refinery curate` command to refresh it")
    given = Path(path)
    resolved = given.resolve()
    wanted = listed_files(root, stats, "files",
                          lambda full: resolved in full.parents and full.name.endswith(suffixes))
    return sorted(given / (root / rel).relative_to(resolved) for rel in wanted)


def listed_files(root: Path, stats: dict[str, Any], key: str = "files",
                 wanted: Callable[[Path], bool] | None = None) -> list[str]:
    """The paths, relative to `root`, that its stats.json (`stats`) lists under `key` (`files`: the
    corpus; `rejected_files`: its kept rejects) and `wanted` accepts; each must exist."""
    paths = []
    for entry in stats.get(key) or []:
        rel = entry["path"]
        full = root / rel
        if wanted is not None and not wanted(full):
            continue
        if not full.is_file():
            raise CorpusError(f"{full} is listed in {root / STATS_FILE} but missing: the corpus was changed after "
                              "its run; rerun `refinery curate` (with --overwrite to start over)")
        paths.append(rel)
    return paths
