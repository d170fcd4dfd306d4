"""Read Parquet files: a corpus `refinery curate` wrote, or any Parquet with a text column.

Streamed one record batch at a time (`ParquetFile.iter_batches`), never a whole file in memory.
`text_key` and `id_key` name the columns (`text`, `id` by default); every other column of a
foreign table goes into `metadata`, and a corpus of ours gets its stored scores back as
attributes (see `rows.py`). A file that is not Parquet, or names no `text_key` column, is one
counted `read.malformed` error; a row without text is a counted `read.bad_row`.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from curation.document import Document
from curation.read.inputs import open_input
from curation.read.rows import RowReader

# Rows per record batch: large enough to amortize Arrow's per-batch cost, small enough that a
# batch of long documents stays a few MB.
BATCH_ROWS = 1024


class ParquetReader(RowReader):
    """Documents of `*.parquet` files, one per row."""

    suffixes: ClassVar[tuple[str, ...]] = (".parquet",)

    def read(self, path: str) -> Iterator[Document]:
        raw = self.opened(path, partial(open_input, path, self.cache_dir))
        if raw is None:
            return
        with raw:
            try:
                pf = pq.ParquetFile(raw)
            except (pa.ArrowException, OSError) as e:
                self.stats.error("read.malformed", file=str(path), message=f"not a Parquet file: {e}"[:300])
                return
            if self.text_key not in pf.schema_arrow.names:
                self.stats.error("read.malformed", file=str(path),
                                 message=f"no column {self.text_key!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                                         "set the reader's text_key")
                return
            yield from self.documents(_rows(pf, str(path), self), str(path))


def _rows(pf: pq.ParquetFile, path: str, reader: ParquetReader) -> Iterator[tuple[int, Any]]:
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for r in batch.to_pylist():
                yield row, r
                row += 1
    except (pa.ArrowException, OSError) as e:  # a damaged row group: keep what came before it
        reader.stats.error("read.malformed", file=path, row=row, message=f"{type(e).__name__}: {e}"[:300])
