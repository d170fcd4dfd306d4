"""Document-type templates crossed with a spec's sections: the prompts of a synthetic-document run.

`plan_jobs(spec, n, ...)` is a pure function of its arguments and prefix-stable: job k is the same
whatever n is, so a rerun with more documents continues the same plan. Coverage is even by
construction: job k writes about section k mod S, so every S consecutive jobs cover every section
once, and section i's r-th job has document type (i + r) mod T, so every S·T jobs cover every
(section, type) pair once. Within a section the focus principle rotates with the round (each of
its P principles once every P rounds). The audience, and for conflicts the other
section, are drawn from a generator seeded by (seed, k).

Conflict prompts show the other section too, and the spec's priorities (its sections whose title
names priorities, precedence, conflicts or trade-offs), so the generator can state how the spec
resolves the tension instead of inventing a resolution.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

from pipelines.synth.spec import Section, Spec

SYSTEM_PROMPT = (
    "You write documents that explain the model specification \"{title}\": the document that says how an "
    "AI assistant should behave, its rules, values and priorities. Be faithful to the spec: explain and "
    "illustrate what it says, and do not invent rules it does not contain. Write the document itself, "
    "with no preface, no notes about the task and no closing offer of more help."
)
CONTEXT = "Section \"{section}\" of the spec says:\n\n{section_text}\n\n"
CONFLICT_CONTEXT = "Section \"{other_section}\" of the spec says:\n\n{other_text}\n\n"
PRIORITY_CONTEXT = "On priorities, the spec says:\n\n{priority_text}\n\n"

# Each type's instruction; placeholders: title, section, principle, audience, other_section,
# other_principle. Add a type here and it joins the plan (`--doc-types` picks a subset).
DOC_TYPES: dict[str, str] = {
    "explanation": (
        "Write an explanatory article for {audience} about this part of \"{title}\", focusing on the "
        "principle: \"{principle}\". Explain what it asks of the assistant, why the spec asks it, and how "
        "it shows in practice."
    ),
    "qa": (
        "Write a question-and-answer document: four or five questions that {audience} might ask about the "
        "principle \"{principle}\" from the section \"{section}\", each followed by a clear answer that "
        "follows the spec. Start each question with 'Q:' and each answer with 'A:'."
    ),
    "scenario": (
        "Write a worked scenario in which the principle \"{principle}\" decides what the assistant should "
        "do. Describe a realistic request, the replies the assistant could give, which one the spec calls "
        "for, and why the others fall short. Write it for {audience}."
    ),
    "essay": (
        "Write a short essay, for {audience}, on why an assistant should follow this principle of "
        "\"{title}\": \"{principle}\". Weigh what it costs and what it protects."
    ),
    "conflict": (
        "Write a discussion, for {audience}, of a situation where the principle \"{principle}\" (section "
        "\"{section}\") seems to pull against \"{other_principle}\" (section \"{other_section}\"). Describe the "
        "situation, explain how the spec resolves the tension and what the assistant should do, and say "
        "why that resolution is right."
    ),
}
AUDIENCES = (
    "a new user of the assistant",
    "a software developer building a product on the assistant",
    "a student of AI ethics",
    "a journalist writing about AI assistants",
    "a curious teenager",
    "a policy analyst",
    "a teacher preparing a class discussion",
    "a member of the team that trains the assistant",
)
_PRIORITY_TITLE = re.compile(r"priorit|precedence|conflict|trade-?off|hierarch", re.IGNORECASE)


@dataclass(frozen=True)
class Job:
    """One document to generate: what it is about and the prompt that asks for it."""

    index: int
    section_id: str
    section: str
    doc_type: str
    principle: str
    audience: str
    messages: tuple[dict[str, str], ...]
    other_section: str | None = None
    other_principle: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_id(self) -> str:
        return f"p{self.index:07d}"

    @property
    def prompt_key(self) -> str:
        """A hash of the prompt text: equal prompts (drawn again in a later round) share it."""
        return hashlib.sha1(json.dumps(self.messages, sort_keys=True).encode()).hexdigest()[:16]


def check_doc_types(doc_types: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if not doc_types:
        return tuple(DOC_TYPES)
    unknown = [t for t in doc_types if t not in DOC_TYPES]
    if unknown:
        raise ValueError(f"unknown document type(s) {unknown}; known: {', '.join(DOC_TYPES)}")
    return tuple(dict.fromkeys(doc_types))


def priority_sections(spec: Spec) -> list[Section]:
    return [s for s in spec.sections if _PRIORITY_TITLE.search(s.title)]


def templates_record(doc_types: tuple[str, ...]) -> dict[str, Any]:
    """Every template text the plan uses, for the run record."""
    return {"system": SYSTEM_PROMPT, "context": CONTEXT, "conflict_context": CONFLICT_CONTEXT,
            "priority_context": PRIORITY_CONTEXT, "doc_types": {t: DOC_TYPES[t] for t in doc_types},
            "audiences": list(AUDIENCES)}


def plan_job(spec: Spec, k: int, doc_types: tuple[str, ...], seed: int) -> Job:
    sections = spec.sections
    n_sec = len(sections)
    i, rnd = k % n_sec, k // n_sec
    section = sections[i]
    doc_type = doc_types[(i + rnd) % len(doc_types)]
    principles = section.principles or (section.text,)
    # Each principle once every P rounds; shifted by one every lcm(T, P) rounds, so that every
    # principle meets every document type even when T and P share a factor.
    principle = principles[(rnd + rnd // math.lcm(len(doc_types), len(principles))) % len(principles)]
    rng = random.Random(f"{seed}:{k}")
    audience = AUDIENCES[rng.randrange(len(AUDIENCES))]
    context = CONTEXT.format(section=section.label, section_text=section.text)
    other: Section | None = None
    other_principle = None
    if doc_type == "conflict":
        others = [s for s in sections if s.id != section.id] or [section]
        other = others[rng.randrange(len(others))]
        other_principles = other.principles or (other.text,)
        other_principle = other_principles[rng.randrange(len(other_principles))]
        context += CONFLICT_CONTEXT.format(other_section=other.label, other_text=other.text)
        rules = [s for s in priority_sections(spec) if s.id not in (section.id, other.id)]
        if rules:
            context += PRIORITY_CONTEXT.format(priority_text="\n\n".join(s.text for s in rules))
    instruction = DOC_TYPES[doc_type].format(
        title=spec.title, section=section.label, principle=principle, audience=audience,
        other_section=other.label if other else "", other_principle=other_principle or "")
    messages = ({"role": "system", "content": SYSTEM_PROMPT.format(title=spec.title)},
                {"role": "user", "content": context + instruction})
    return Job(index=k, section_id=section.id, section=section.label, doc_type=doc_type, principle=principle,
               audience=audience, messages=messages, other_section=other.label if other else None,
               other_principle=other_principle)


def plan_jobs(spec: Spec, n: int, doc_types: tuple[str, ...], seed: int = 0, start: int = 0) -> list[Job]:
    """Jobs start .. n-1 of the plan."""
    return [plan_job(spec, k, doc_types, seed) for k in range(start, n)]
