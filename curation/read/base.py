"""The reader contract: one input file in, a stream of Documents out, with counted faults.

A reader is the first step of every phase-1 task. The pipeline builds it from the config's
`reader:` spec (`warc` by default) with three arguments of its own: `source` (the config's),
`added` (the run's timestamp) and `cache_dir` (where remote inputs are downloaded). It counts
into `self.stats` (a `StepStats("read")`, the first row of the funnel): `docs_out`, its own
`seconds`, `counters` by kind, and errors with a sample naming file and position. `read` never
raises for a bad file: an input it cannot open is a `read.unavailable` error (retried on a rerun),
a damaged one a counted error, and reading goes on with the next file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import ClassVar, TypeVar

from curation.corpus import curated_files
from curation.document import Document
from curation.read.inputs import MissingBackend
from curation.step import StepStats

T = TypeVar("T")


class Reader:
    """Base class of readers; subclasses implement `read` and name the files they take (`suffixes`)."""

    # The funnel's first row is "read" whichever reader it is.
    name: ClassVar[str] = "read"
    # What a plain input directory contributes: its files with one of these endings, recursively.
    suffixes: ClassVar[tuple[str, ...]] = ()
    # What one phase-1 task needs for this reader (see curation.registry.phase_resources).
    resources: ClassVar[dict[str, float]] = {}

    def __init__(self, source: str = "common-crawl", added: str = "", cache_dir: str | None = None) -> None:
        self.source = source
        self.added = added
        self.cache_dir = cache_dir
        self.stats = StepStats(self.name)

    def read(self, path: str) -> Iterator[Document]:
        """Documents of one input file, in file order. Never raises for a bad file."""
        raise NotImplementedError

    def opened(self, path: str, opener: Callable[[], T]) -> T | None:
        """What `opener` opens for input `path` (e.g. `open_input(path, self.cache_dir)`); None when
        it cannot (a missing file, a failed download): a counted, logged `read.unavailable` error,
        retried on a rerun. A missing backend is raised: a setup problem for every remote input,
        not a fault of this file."""
        try:
            return opener()
        except MissingBackend:
            raise
        except Exception as e:  # noqa: BLE001 - whatever kept the input from opening, retried on a rerun
            self.stats.error("read.unavailable", file=str(path), message=f"{type(e).__name__}: {e}")
            logging.getLogger(type(self).__module__).warning(
                "%s: unavailable (%s: %s); a rerun retries it", path, type(e).__name__, e)
            return None

    def files_in(self, directory: str) -> list[str]:
        """The input files a directory given as input stands for: a finished curation output's
        document files (those its stats.json lists), else every file under it with one of
        `suffixes`, sorted by path. An unfinished curation output is an error (CorpusError)."""
        listed = curated_files(directory, self.suffixes)
        if listed is not None:
            found = [str(p) for p in listed]
            if not found:
                raise FileNotFoundError(f"the corpus {directory!r} lists no {' / '.join(self.suffixes)} files; "
                                        f"choose the reader that matches its format")
            return found
        found = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(directory)
            for name in names
            if name.endswith(self.suffixes) and not name.startswith(".")
        )
        if not found:
            raise FileNotFoundError(f"input directory {directory!r} holds no files this reader reads (looked for "
                                    f"{', '.join(self.suffixes)} in it and its subdirectories)")
        return found
