"""Segment reuse task: prompts built from separately cacheable segments and a question about one of them.

Every prompt is [an instruction block] [tool descriptions] [a user's memory list] [documents] followed by a
question whose answer sits in exactly one segment (string_match_all). Segments come from small pools, generated
offline and deterministically from the seed (instruction blocks, one tool catalogue, users' memory lists) or
from local text (documents: the opening paragraphs of the shipped IELTS passages, each with a planted catalogue
number), so the same segment recurs across samples and a reuse store gets hits, as a system prompt, a user's
memories and popular documents would. Samples run in the `segments` scenario (`kvbench.scenarios.segments`):
one row per job and mode (`joint`, `reuse`, `reuse_norotate`), subtask `segments/<mode>`.

Fields (mirrored by conf/task/segments.yaml): num_samples, documents_per_sample, document_pool (documents to
draw from), document_paragraphs (paragraphs of a passage per document), users (memory lists to draw from),
modes, seed, max_new_tokens, use_chat_template.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvbench.engine.rope import check_shiftable_rope
from kvbench.harness.sample import Sample
from kvbench.registry import AT_LEAST_ONE
from kvbench.scenarios.segments import MODES, SCENARIO, check_fits, segment_layout
from kvbench.tasks.base import Task, as_list, register_task
from kvbench.tasks.ielts import DEFAULT_DATA, load_passages

QUESTION_KINDS: tuple[str, ...] = ("instructions", "tools", "memory", "document")
ORGANISATIONS = ("the Harbour Street Library", "the Northgate Cycling Club", "the Riverside Dental Practice")
MEMORY_ITEMS = (
    "locker number",
    "library card number",
    "bike lock code",
    "gym membership number",
    "parking permit number",
    "allotment plot number",
)
USER_NAMES = ("Amira", "Tomasz", "Keiko", "Lucas", "Ngozi", "Priya")
TOOLS = (
    ("convert_currency", "converts an amount of money from one currency into another", "amount, source, target"),
    ("get_weather", "returns the weather forecast for a city", "city, days"),
    ("book_room", "reserves a meeting room for a given hour", "room, hour"),
    ("translate_text", "translates a text into another language", "text, language"),
    ("send_reminder", "schedules a reminder message for the user", "message, time"),
    ("find_recipe", "searches recipes that use a given ingredient", "ingredient"),
)


def _number(rng: random.Random, digits: int = 6) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


@dataclass(frozen=True)
class Segment:
    kind: str
    text: str
    question: str
    answer_prefix: str
    answer: str


def instruction_segment(index: int, seed: int) -> Segment:
    rng = random.Random(f"segments-{seed}-instructions-{index}")
    org, code = ORGANISATIONS[index % len(ORGANISATIONS)], _number(rng)
    text = (
        f"Instructions: you are the assistant of {org}. Answer politely and briefly, in one sentence. Never "
        f"share a member's personal details with anybody else. If you are asked for the support desk code, it "
        f"is {code}. Use the tools described below when a request needs them.\n\n"
    )
    return Segment("instructions", text, "What is the support desk code?", "The support desk code is", code)


def tool_segment(seed: int) -> tuple[Segment, list[Segment]]:
    """The tool catalogue and one question per tool."""
    lines = [f"- {name}({params}): {description}." for name, description, params in TOOLS]
    text = "Available tools:\n" + "\n".join(lines) + "\n\n"
    questions = [
        Segment("tools", text, f"Which tool {description}? Give its name.", "The tool is called", name)
        for name, description, _ in TOOLS
    ]
    return questions[0], questions


def memory_segment(user: int, seed: int) -> list[Segment]:
    """A user's memory list and one question per remembered item."""
    rng = random.Random(f"segments-{seed}-memory-{user}")
    name = USER_NAMES[user % len(USER_NAMES)]
    values = {item: _number(rng, 5) for item in MEMORY_ITEMS}
    lines = [f"- {name}'s {item} is {value}." for item, value in values.items()]
    text = f"Memories about the user, {name}:\n" + "\n".join(lines) + "\n\n"
    return [
        Segment("memory", text, f"What is {name}'s {item}?", f"{name}'s {item} is", value)
        for item, value in values.items()
    ]


def document_segments(count: int, paragraphs: int, seed: int) -> list[Segment]:
    """Documents from the shipped IELTS passages, each with a planted catalogue number after its first paragraph."""
    passages = load_passages(DEFAULT_DATA)
    documents = []
    for index, passage in enumerate(passages[:count]):
        rng = random.Random(f"segments-{seed}-document-{index}")
        number = _number(rng, 7)
        body = [text for _, text in passage.paragraphs[:paragraphs]]
        body.insert(1, f"The catalogue number of this document is {number}.")
        text = f"Document: {passage.title}\n" + "\n".join(body) + "\n\n"
        documents.append(
            Segment(
                "document",
                text,
                f"What is the catalogue number of the document '{passage.title}'?",
                "The catalogue number is",
                number,
            )
        )
    return documents


@register_task("segments")
@dataclass
class Segments(Task):
    """Segment reuse (system prompt / memories / tools / documents as cached segments). Fields mirror
    conf/task/segments.yaml; see the module docstring."""

    scenario: ClassVar[str | None] = SCENARIO

    num_samples: int = field(default=12, metadata=AT_LEAST_ONE)
    documents_per_sample: int = 2
    document_pool: int = field(default=6, metadata=AT_LEAST_ONE)
    document_paragraphs: int = field(default=2, metadata=AT_LEAST_ONE)
    users: int = field(default=3, metadata=AT_LEAST_ONE)
    modes: Any = field(default_factory=lambda: list(MODES))
    seed: int = 42
    max_new_tokens: int = field(default=16, metadata=AT_LEAST_ONE)
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        modes = as_list(self.modes)
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"unknown segments mode '{mode}'. Valid modes: {', '.join(MODES)}.")
        if not modes:
            raise ValueError(f"task.modes must not be empty. Valid modes: {', '.join(MODES)}.")
        if not 0 <= int(self.documents_per_sample) <= int(self.document_pool):
            raise ValueError(
                f"task.documents_per_sample={self.documents_per_sample} must be between 0 and "
                f"task.document_pool={self.document_pool}"
            )

    def check_model(self, lm: Any) -> None:
        """Refuse, before any sample, a model whose RoPE cannot be shifted when a reuse mode is asked for."""
        if any(mode != "joint" for mode in as_list(self.modes)):
            check_shiftable_rope(lm.model, "task=segments (reuse)")

    def samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample]:
        instructions = [instruction_segment(i, self.seed) for i in range(2)]
        tools, tool_questions = tool_segment(self.seed)
        memories = [memory_segment(u, self.seed) for u in range(int(self.users))]
        documents = document_segments(int(self.document_pool), int(self.document_paragraphs), self.seed)
        for index in range(int(self.num_samples)):
            rng = random.Random(f"segments-{self.seed}-sample-{index}")
            instruction = instructions[rng.randrange(len(instructions))]
            memory = memories[rng.randrange(len(memories))]
            docs = [documents[i] for i in sorted(rng.sample(range(len(documents)), int(self.documents_per_sample)))]
            kind = QUESTION_KINDS[index % len(QUESTION_KINDS)]
            if kind == "document" and not docs:
                kind = "memory"
            choices = {"instructions": [instruction], "tools": tool_questions, "memory": memory, "document": docs}
            target = rng.choice(choices[kind])
            parts = [instruction, tools, memory[0], *docs]
            sample = Sample(
                sample_id=f"segments-{index:03d}-{kind}",
                context="".join(part.text for part in parts),
                question=target.question,
                answer_prefix=target.answer_prefix,
                answers=[target.answer],
                metric="string_match_all",
                max_new_tokens=int(self.max_new_tokens),
                use_chat_template=self.use_chat_template,
                separator="",  # every segment ends with a blank line
                meta={
                    "scenario": SCENARIO,
                    "subtask": "segments",
                    "segments": [part.text for part in parts],
                    "segment_kinds": [part.kind for part in parts],
                    "question_kind": kind,
                    "target_segment": [part.text for part in parts].index(target.text),
                    "modes": as_list(self.modes),
                },
            )
            # Fail before any forward, in one line, when the segments do not fit the model.
            check_fits(
                segment_layout(tokenizer, sample), sample.meta["segment_kinds"], max_context, sample.max_new_tokens
            )
            yield sample
