"""`make bench` runs exactly the commands docs/benchmarks.md documents in its section headings."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def heading_commands() -> list[str]:
    """Every `python benchmarks/...` command quoted in a heading of docs/benchmarks.md, in order."""
    text = (REPO / "docs" / "benchmarks.md").read_text()
    return [cmd for line in text.splitlines() if line.startswith("#")
            for cmd in re.findall(r"`(python benchmarks/[^`]+)`", line)]


def make_recipe(target: str) -> list[str]:
    """The commands of a Makefile target, `$(BIN)/python` read as `python`, comments left out."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        cmd = line.strip()
        if not cmd.startswith("#"):
            recipe.append(cmd.replace("$(BIN)/python", "python"))
    return recipe


def test_make_bench_runs_exactly_the_documented_commands() -> None:
    documented = heading_commands()
    mix = [c for c in documented if c.startswith("python benchmarks/mix_sweep.py")]
    assert len(mix) == 1 and make_recipe("bench-mix") == mix
    assert make_recipe("bench") == [c for c in documented if c not in mix]
    for cmd in documented:
        assert (REPO / cmd.split()[1]).is_file(), cmd
