"""Step 1 of curation: find the input archives and read their records into Documents."""

from curation.read.inputs import expand_inputs, open_input
from curation.read.warc import WarcReader

__all__ = ["WarcReader", "expand_inputs", "open_input"]
