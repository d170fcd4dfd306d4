"""Instruction, chat and preference files → conversations and preference pairs.

Formats (`FORMATS`; "auto" picks one per file from the keys of its first JSON object):

    messages       {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}: the
                   de-facto chat JSONL. As preference data: {"chosen": [msgs], "rejected": [msgs]},
                   optionally with "prompt" (a message list prepended to both, or a string used as the
                   first user turn when the lists do not start with one; TRL's two layouts).
    alpaca         {"instruction", "input", "output"} (Stanford Alpaca, Code Alpaca)
    gpteacher      {"instruction", "input", "response"} (GPTeacher)
    self-instruct  {"instruction", "instances": [{"input", "output"}, ...]} (Self-Instruct
                   user-oriented set, Alpaca seed tasks): one conversation per instance
    completion     {"prompt", "completion"} (T0/P3 templates; a trailing <|endoftext|> is removed)
    hh             {"chosen": str, "rejected": str}, Anthropic HH-RLHF transcripts
                   "\\n\\nHuman: ... \\n\\nAssistant: ..."

The instruction formats become one user turn (instruction, a blank line, then the input if any)
and one assistant turn. Their texts and HH turns are stripped of surrounding whitespace (artifacts
of the separators); `messages` contents are kept as written.

A preference pair is (prompt, chosen, rejected): prompt = the turns both transcripts share,
chosen/rejected = their final assistant turns. A row that cannot be used becomes `Dropped(reason)`,
counted by the caller; nothing here raises on bad data.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "alpaca", "gpteacher", "self-instruct", "completion", "hh")
PAIR_FORMATS = ("messages", "hh")  # formats that can carry chosen/rejected pairs
INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")

# Why a row was dropped; every drop is counted under one of these in manifest.json["dropped"].
BAD_JSON = "bad_json"                  # a line that is not JSON, or a row that is not an object
MISSING_FIELD = "missing_field"        # a key the format needs is absent or of the wrong type
UNKNOWN_ROLE = "unknown_role"          # a message role other than system / user / assistant
EMPTY_ASSISTANT = "empty_assistant"    # an assistant turn with no text
NO_ASSISTANT = "no_assistant_turn"     # nothing to learn from (or, in a pair, not ending with one)
BAD_TRANSCRIPT = "bad_transcript"      # HH text outside any Human/Assistant turn
PROMPT_MISMATCH = "prompt_mismatch"    # chosen and rejected do not share the turns before the last
IDENTICAL_PAIR = "identical_pair"      # chosen == rejected: no preference signal
TOO_LONG = "too_long"                  # longer than --max-len tokens once templated (set by chat.py)
DROP_REASONS = (BAD_JSON, MISSING_FIELD, UNKNOWN_ROLE, EMPTY_ASSISTANT, NO_ASSISTANT, BAD_TRANSCRIPT,
                PROMPT_MISMATCH, IDENTICAL_PAIR, TOO_LONG)


@dataclass(frozen=True)
class Conversation:
    messages: list[Message]


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[Message]
    chosen: Message     # the final assistant turn of the preferred transcript
    rejected: Message   # ... and of the dispreferred one

    def conversation(self) -> Conversation:
        """The preferred transcript as an ordinary conversation (SFT on the chosen side)."""
        return Conversation([*self.prompt, self.chosen])


@dataclass(frozen=True)
class Dropped:
    reason: str


Example = Conversation | PreferencePair


class _Malformed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def detect_format(row: Any) -> str | None:
    """The format whose keys this row has, or None."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "chosen" in row and "rejected" in row:
        return "hh" if isinstance(row["chosen"], str) else "messages"
    if "instruction" in row:
        if "instances" in row:
            return "self-instruct"
        if "response" in row:
            return "gpteacher"
        if "output" in row:
            return "alpaca"
    if "prompt" in row and "completion" in row:
        return "completion"
    return None


def _text(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise _Malformed(MISSING_FIELD)
    return value


def _checked(messages: Any) -> list[Message]:
    """Validate a message list: known roles, string contents, at least one non-empty assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise _Malformed(MISSING_FIELD)
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise _Malformed(MISSING_FIELD)
        if m["role"] not in ROLES:
            raise _Malformed(UNKNOWN_ROLE)
        if m["role"] == "assistant" and not m["content"].strip():
            raise _Malformed(EMPTY_ASSISTANT)
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise _Malformed(NO_ASSISTANT)
    return out


def _instruction_turn(instruction: str, input_text: str) -> Message:
    parts = [t.strip() for t in (instruction, input_text) if t.strip()]
    return {"role": "user", "content": "\n\n".join(parts)}


def _single_turn(user: Message, answer: str) -> Conversation:
    return Conversation(_checked([user, {"role": "assistant", "content": answer.strip()}]))


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> list[Message]:
    """An HH-RLHF transcript as messages. Consecutive turns of one speaker (a few transcripts have
    "Assistant:" twice in a row) are joined by a blank line, so roles alternate."""
    pieces = _HH_TURN.split(text)
    if pieces[0].strip() or len(pieces) < 3:
        raise _Malformed(BAD_TRANSCRIPT)
    messages: list[Message] = []
    for speaker, content in zip(pieces[1::2], pieces[2::2], strict=True):
        role, content = _HH_ROLE[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}".strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def _pair(chosen: list[Message], rejected: list[Message]) -> PreferencePair:
    """Split two transcripts into their shared prompt and final assistant turns."""
    for side in (chosen, rejected):
        if side[-1]["role"] != "assistant":
            raise _Malformed(NO_ASSISTANT)
    if chosen[:-1] != rejected[:-1]:
        raise _Malformed(PROMPT_MISMATCH)
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise _Malformed(IDENTICAL_PAIR)
    return PreferencePair(chosen[:-1], chosen[-1], rejected[-1])


def _messages_pair(row: dict) -> PreferencePair:
    chosen, rejected = _checked(row["chosen"]), _checked(row["rejected"])
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        prompt_msgs = _checked_prompt(prompt)
        chosen, rejected = prompt_msgs + chosen, prompt_msgs + rejected
    elif isinstance(prompt, str) and chosen[0]["role"] != "user":
        turn = {"role": "user", "content": prompt}
        chosen, rejected = [turn, *chosen], [turn, *rejected]
    return _pair(chosen, rejected)


def _checked_prompt(prompt: list) -> list[Message]:
    # A prompt has no assistant turn to check, so borrow _checked with a placeholder answer.
    return _checked([*prompt, {"role": "assistant", "content": "x"}])[:-1]


def parse_row(row: Any, fmt: str, pairs: bool) -> list[Example | Dropped]:
    """The examples of one row: conversations, or preference pairs when `pairs` (only for
    PAIR_FORMATS). Usually one; a self-instruct task gives one per instance."""
    if not isinstance(row, dict):
        return [Dropped(BAD_JSON)]
    try:
        if fmt == "messages":
            if pairs:
                if "chosen" not in row or "rejected" not in row:
                    raise _Malformed(MISSING_FIELD)
                return [_messages_pair(row)]
            if "messages" not in row and "chosen" in row:  # a preference row used for SFT
                return [_messages_pair(row).conversation()]
            return [Conversation(_checked(row.get("messages")))]
        if fmt == "hh":
            chosen = parse_hh_transcript(_text(row, "chosen"))
            if not pairs:
                return [Conversation(_checked(chosen))]
            rejected = parse_hh_transcript(_text(row, "rejected"))
            return [_pair(_checked(chosen), _checked(rejected))]
        if fmt in ("alpaca", "gpteacher"):
            user = _instruction_turn(_text(row, "instruction"), _text(row, "input", required=False))
            return [_single_turn(user, _text(row, "output" if fmt == "alpaca" else "response"))]
        if fmt == "completion":
            completion = _text(row, "completion").removesuffix("<|endoftext|>")
            return [_single_turn({"role": "user", "content": _text(row, "prompt").strip()}, completion)]
        if fmt == "self-instruct":
            instruction, instances = _text(row, "instruction"), row.get("instances")
            if not isinstance(instances, list) or not instances:
                raise _Malformed(MISSING_FIELD)
            out: list[Example | Dropped] = []
            for inst in instances:
                try:
                    if not isinstance(inst, dict):
                        raise _Malformed(MISSING_FIELD)
                    user = _instruction_turn(instruction, _text(inst, "input", required=False))
                    out.append(_single_turn(user, _text(inst, "output")))
                except _Malformed as e:
                    out.append(Dropped(e.reason))
            return out
    except _Malformed as e:
        return [Dropped(e.reason)]
    raise ValueError(f"unknown chat format {fmt!r}; expected one of {', '.join(FORMATS)}")


def input_files(inputs: list[str | Path]) -> list[Path]:
    """Files as given, directories expanded to their JSON / JSON-lines files (sorted)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(INPUT_SUFFIXES)
                           and not f.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"no chat files ({', '.join(INPUT_SUFFIXES)}) under {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"chat input not found: {p}")
    return files


def read_rows(path: Path) -> tuple[Iterator[Any], int | None]:
    """(rows, count if known). A file starting with "[" is one JSON array; anything else is JSON
    lines, where an unparseable line is yielded as None (counted as bad_json, never fatal). A file
    that cannot be read at all (a truncated gzip) is a ValueError naming it."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            head = f.read(4096).lstrip()
        if head.startswith("["):
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                rows = json.load(f)
            return iter(rows), len(rows)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a valid JSON array ({e}); fix the file or convert it to JSON "
                         "lines, where a bad line is skipped and counted") from e
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e

    def lines() -> Iterator[Any]:
        try:
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError:
                            yield None
        except (OSError, EOFError) as e:
            raise ValueError(f"cannot read {path}: {e}; inputs finished before it are kept, "
                             "a rerun resumes after them") from e
    return lines(), None


def first_object(path: Path) -> dict | None:
    """The first JSON object row of a file (None if it has none)."""
    rows, _ = read_rows(path)
    return next((row for row in rows if isinstance(row, dict)), None)


def sniff_format(path: Path) -> str:
    """The format of a file, from the keys of its first JSON object."""
    row = first_object(path)
    if row is None:
        raise ValueError(f"{path} holds no JSON object rows; is it a chat/instruction file?")
    fmt = detect_format(row)
    if fmt is None:
        raise ValueError(f"cannot tell the chat format of {path} from its keys {sorted(row)}; "
                         f"pass --format ({', '.join(FORMATS)})")
    return fmt


def holds_pairs(path: Path) -> bool:
    """Whether the file's rows are chosen/rejected pairs (its first object has both keys)."""
    row = first_object(path)
    return row is not None and "chosen" in row and "rejected" in row


def read_examples(path: str | Path, fmt: str = "auto", pairs: bool = False) -> Iterator[Example | Dropped]:
    """Every example (or Dropped) of one file, in order; `fmt` "auto" sniffs it."""
    path = Path(path)
    fmt = sniff_format(path) if fmt == "auto" else fmt
    rows, _ = read_rows(path)
    for row in rows:
        yield from parse_row(row, fmt, pairs)
