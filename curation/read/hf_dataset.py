"""Read a Hugging Face dataset saved with `save_to_disk`: a folder of Arrow files.

Given the folder (or a `DatasetDict`'s, whose `splits` are chosen with the `splits` parameter),
the input is its Arrow files in the order `state.json` lists them, each read as one input file,
so a large dataset is read by as many tasks as it has files. Each file is memory-mapped and read
one record batch at a time: with the `datasets` library when it is installed (its own reader,
which knows every version of its layout), else with pyarrow's IPC stream reader. Rows become
Documents as in `rows.py` (`text_key`, `id_key`; other columns go into metadata).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any, ClassVar, Literal

import pyarrow as pa

from curation.document import Document
from curation.read.inputs import download, is_remote
from curation.read.rows import RowReader

BATCH_ROWS = 1024
_INSTALL = "pip install datasets"


def datasets_installed() -> bool:
    return importlib.util.find_spec("datasets") is not None


class HfDatasetReader(RowReader):
    """Documents of a `save_to_disk` dataset's Arrow files, one per row."""

    suffixes: ClassVar[tuple[str, ...]] = (".arrow",)

    def __init__(
        self,
        source: str = "common-crawl",
        added: str = "",
        cache_dir: str | None = None,
        text_key: str = "text",
        id_key: str = "id",
        splits: Sequence[str] | None = None,
        backend: Literal["auto", "datasets", "pyarrow"] = "auto",
    ) -> None:
        super().__init__(source=source, added=added, cache_dir=cache_dir, text_key=text_key, id_key=id_key)
        if backend == "datasets" and not datasets_installed():
            raise ValueError(f"backend 'datasets' needs the datasets library: {_INSTALL}")
        self.splits = list(splits) if splits is not None else None
        if backend == "auto":
            backend = "datasets" if datasets_installed() else "pyarrow"
        self.backend = backend

    def files_in(self, directory: str) -> list[str]:
        """A dataset folder's Arrow files in `state.json` order; a DatasetDict's, split by split."""
        splits_file = os.path.join(directory, "dataset_dict.json")
        if os.path.isfile(splits_file):
            with open(splits_file) as f:
                known = list(json.load(f).get("splits", []))
            chosen = self.splits if self.splits is not None else known
            missing = [s for s in chosen if s not in known]
            if missing:
                raise ValueError(f"{directory}: no split {missing[0]!r} in this DatasetDict (splits: {', '.join(known)})")
            return [f for split in chosen for f in self._arrow_files(os.path.join(directory, split))]
        if os.path.isfile(os.path.join(directory, "state.json")):
            return self._arrow_files(directory)
        return super().files_in(directory)

    @staticmethod
    def _arrow_files(folder: str) -> list[str]:
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
        files = [os.path.join(folder, d["filename"]) for d in state.get("_data_files", [])]
        if not files:
            raise FileNotFoundError(f"{folder}/state.json lists no data files; save the dataset again with save_to_disk")
        return files

    def read(self, path: str) -> Iterator[Document]:
        local = self.opened(path, partial(self._local, path))
        if local is None:
            return
        batches = _datasets_batches(local) if self.backend == "datasets" else _arrow_batches(local)
        yield from self.documents(self._rows(batches, str(path)), str(path))

    def _local(self, path: str) -> str:
        """The Arrow file on this machine (a remote one downloaded into the cache)."""
        local = str(download(path, self.cache_dir)) if is_remote(path) else path
        if not os.path.isfile(local):
            raise FileNotFoundError(local)
        return local

    def _rows(self, batches: Iterator[list[dict[str, Any]]], path: str) -> Iterator[tuple[int, Any]]:
        row = 0
        try:
            for batch in batches:
                for r in batch:
                    yield row, r
                    row += 1
        except (pa.ArrowException, OSError, ValueError) as e:
            hint = "" if self.backend == "datasets" else f" (the datasets library may read it: {_INSTALL})"
            self.stats.error("read.malformed", file=path, row=row, message=f"{type(e).__name__}: {e}"[:300] + hint)


def _datasets_batches(path: str) -> Iterator[list[dict[str, Any]]]:
    from datasets import Dataset

    ds = Dataset.from_file(path)  # memory-mapped: nothing is loaded until a batch is read
    for batch in ds.iter(batch_size=BATCH_ROWS):
        names = list(batch)
        yield [dict(zip(names, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _arrow_batches(path: str) -> Iterator[list[dict[str, Any]]]:
    """`save_to_disk` writes Arrow's streaming format; the file format is read too."""
    with pa.memory_map(path) as source:
        try:
            reader: Any = pa.ipc.open_stream(source)
            batches: Iterator[pa.RecordBatch] = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in batches:
            yield batch.to_pylist()
