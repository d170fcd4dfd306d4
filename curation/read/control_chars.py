"""C0 control characters out of document text.

NUL and the other C0 controls (U+0000-U+001F) other than tab, newline and carriage return carry
no text, break tools downstream (NUL ends C strings, JSON viewers and tokenizers choke) and reach
the corpus from WET records and from extracted pages. Form feed and vertical tab separate pages
and lines (WET text of PDFs has a form feed between pages), so they become a newline rather than
gluing two words together; the rest are removed.
"""

from __future__ import annotations

import re

_C0 = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_LINE_BREAKS = frozenset("\x0b\x0c")


def _replacement(m: re.Match[str]) -> str:
    return "\n" if m.group() in _LINE_BREAKS else ""


def strip_control_chars(text: str) -> tuple[str, int]:
    """`text` without C0 controls (form feed / vertical tab as newlines), and how many there were."""
    if _C0.search(text) is None:  # the common case: one scan, no copy
        return text, 0
    return _C0.subn(_replacement, text)
