"""A Model Spec in markdown, split into its sections and their principles.

Sections are the markdown headings (`#` … `######`, outside code fences). A single level-1 heading
at the top is the spec's title, not a section; text before the first section heading becomes an
"Overview" section. A heading whose body is empty (only subsections follow) is no section of its own:
its title stays in its subsections' `path`. A section's principles are its top-level list items
(`-`, `*`, `+`, `1.`, `1)`, with their continuation lines); a section without a list has its
paragraphs as principles.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_ITEM = re.compile(r"^([-*+]|\d{1,3}[.)])\s+(.*)$")
_FENCE = re.compile(r"^\s*(```|~~~)")


class SpecError(ValueError):
    """A spec file that cannot be split into sections."""


@dataclass(frozen=True)
class Section:
    id: str  # "s03-honesty": order and slug, stable while the spec's headings stay
    title: str
    path: tuple[str, ...]  # enclosing headings, outermost first, ending with the title
    text: str  # the section's body, markdown
    principles: tuple[str, ...]

    @property
    def label(self) -> str:
        return " > ".join(self.path)


@dataclass(frozen=True)
class Spec:
    title: str
    sections: tuple[Section, ...]
    sha256: str
    source: str

    def section(self, section_id: str) -> Section:
        for s in self.sections:
            if s.id == section_id:
                return s
        raise KeyError(section_id)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "section"


def principles_of(body: str) -> tuple[str, ...]:
    """Top-level list items of a section body (with their continuation lines and nested items), or
    its paragraphs when it has no list."""
    items: list[list[str]] = []
    current: list[str] | None = None
    blank = False
    for line in body.splitlines():
        stripped = line.strip()
        m = _ITEM.match(line)  # anchored at column 0: a top-level item
        if m:
            current = [m.group(2).strip()]
            items.append(current)
        elif not stripped:
            blank = True
            continue
        elif current is not None and (line[:1].isspace() or not blank):
            current.append(stripped)  # an indented or lazy continuation, or a nested item
        else:
            current = None  # a paragraph after the list
        blank = False
    if items:
        return tuple(t for t in (" ".join(parts).strip() for parts in items) if t)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
    return tuple(p for p in paragraphs if p)


def parse_spec(text: str, source: str = "<spec>") -> Spec:
    """Split markdown into sections; raises SpecError when it has no section heading or no section
    has any text."""
    headings: list[tuple[int, str, list[str]]] = []  # level, title, body lines
    preamble: list[str] = []
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        m = None if fenced else _HEADING.match(line)
        if m and m.group(2):
            headings.append((len(m.group(1)), m.group(2).strip(), []))
        elif headings:
            headings[-1][2].append(line)
        else:
            preamble.append(line)
    title = Path(source).stem
    top_level = [h for h in headings if h[0] == 1]
    if headings and headings[0][0] == 1 and len(top_level) == 1:
        title = headings[0][1]
        preamble = preamble + headings[0][2]  # text under the title, before the first section
        headings = headings[1:]
    if not headings:
        raise SpecError(f"{source} has no section headings: write the spec in markdown with a '## ' heading "
                        "per section and its rules under it")
    raw: list[tuple[tuple[str, ...], str]] = []
    if "\n".join(preamble).strip():
        raw.append((("Overview",), "\n".join(preamble).strip()))
    stack: list[tuple[int, str]] = []
    for level, heading, body in headings:
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, heading))
        content = "\n".join(body).strip()
        if content:
            raw.append((tuple(h for _, h in stack), content))
    if not raw:
        raise SpecError(f"{source} has no section with text: write the spec in markdown with a '## ' heading "
                        "per section and its rules under it")
    sections = tuple(
        Section(id=f"s{i:02d}-{_slug(path[-1])}", title=path[-1], path=path, text=body,
                principles=principles_of(body))
        for i, (path, body) in enumerate(raw, start=1)
    )
    return Spec(title=title, sections=sections, sha256=hashlib.sha256(text.encode()).hexdigest(), source=source)


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path} is not UTF-8 text: {e}") from e
    return parse_spec(text, source=path.name)
