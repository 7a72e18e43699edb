"""Multi-turn conversation (`task=conversation`): one growing KV cache per dialogue, one row per turn.

Dialogues are generated offline from the seed (text written for this project). In the first turns the user
states personal facts ("My locker code is 4821."), later turns ask about them ("What is my locker code?", with
an answer prefix such as "Your locker code is"), and chat turns (small talk, a request for an opinion) fill the
rest. Every user message is padded with small-talk sentences to about `user_tokens` tokens of the model's own
tokenizer. Question turns are scored with string_match_all against the stated value; fact and chat turns have
no question (score null). The run itself is `kvbench.scenarios.conversation`; the budget semantics, the
compression policy and `compress_older_than` are documented there.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvbench.harness.sample import Sample
from kvbench.registry import AT_LEAST_ONE
from kvbench.scenarios import SCENARIO_KEY
from kvbench.scenarios import conversation as _runner  # noqa: F401  (registers the scenario runner)
from kvbench.scenarios.dialogue import POLICIES, SCENARIO, Turn, dialogue_pieces, overflow_turn
from kvbench.tasks.base import PlannedSample, Task, register_task

FIRST_NAMES = [
    "Amara",
    "Bjorn",
    "Chiara",
    "Dmitri",
    "Esther",
    "Farid",
    "Greta",
    "Hiroshi",
    "Ines",
    "Jonas",
    "Keziah",
    "Lorenzo",
    "Marisol",
    "Nikolai",
    "Oona",
    "Priya",
    "Quentin",
    "Rosalind",
    "Soren",
    "Tamsin",
]
CITIES = [
    "Lisbon",
    "Tallinn",
    "Valparaiso",
    "Kyoto",
    "Winnipeg",
    "Marrakesh",
    "Ljubljana",
    "Hobart",
    "Bergen",
    "Cusco",
    "Tbilisi",
    "Dunedin",
    "Porto",
    "Gdansk",
    "Asheville",
    "Trieste",
]
COLOURS = ["turquoise", "maroon", "saffron", "lilac", "olive", "crimson", "teal", "amber", "indigo", "coral"]
PETS = ["Biscuit", "Pickle", "Waffles", "Juniper", "Mochi", "Pepper", "Noodle", "Clover", "Ziggy", "Tofu"]


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(10 ** (n - 1), 10**n - 1))


# (statement, question, answer prefix, value generator): facts a user might tell an assistant.
FACTS: list[tuple[str, str, str, Any]] = [
    ("My locker code is {v}.", "What is my locker code?", "Your locker code is", lambda r: _digits(r, 4)),
    ("My sister's name is {v}.", "What is my sister's name?", "Your sister's name is", lambda r: r.choice(FIRST_NAMES)),
    ("I was born in {v}.", "In which city was I born?", "You were born in", lambda r: r.choice(CITIES)),
    ("My flight number is KV{v}.", "What is my flight number?", "Your flight number is", lambda r: _digits(r, 3)),
    ("My dog is called {v}.", "What is my dog called?", "Your dog is called", lambda r: r.choice(PETS)),
    (
        "My favourite colour is {v}.",
        "What is my favourite colour?",
        "Your favourite colour is",
        lambda r: r.choice(COLOURS),
    ),
    (
        "My apartment number is {v}.",
        "What is my apartment number?",
        "Your apartment number is",
        lambda r: _digits(r, 3),
    ),
    (
        "My best friend {v} lives next door.",
        "What is the name of my best friend?",
        "Your best friend is",
        lambda r: r.choice(FIRST_NAMES),
    ),
]

# Small talk used for chat turns and to pad every message to its length.
SMALL_TALK = [
    "The weather here has been grey all week, with a little rain every afternoon.",
    "I spent the morning reorganising the bookshelf by colour instead of by author.",
    "My neighbour has started learning the trumpet, which is mostly charming.",
    "We tried a new noodle place downtown and the broth was excellent.",
    "I keep meaning to go running before work but the bed is very comfortable.",
    "The train was twenty minutes late again, so I read half a novel on the platform.",
    "I planted tomatoes on the balcony and they are finally turning red.",
    "Yesterday I repaired a wobbly chair with nothing but glue and patience.",
    "There is a small market on Saturdays that sells the best bread in town.",
    "I have been trying to cook one new recipe every week this month.",
    "The museum had an exhibition about old maps that I enjoyed a lot.",
    "My laptop fan makes a strange noise whenever I open too many tabs.",
    "I watched a documentary about octopuses and now I want to learn more.",
    "The park near my office is full of ducks in the spring.",
    "A friend lent me a board game that takes three hours to finish.",
    "I am thinking about repainting the kitchen a warmer shade.",
    "Our team finished a big project at work and celebrated with cake.",
    "I found an old box of letters from my grandparents in the attic.",
    "The cinema down the road shows classic films on Tuesday nights.",
    "I started learning to play chess again after many years.",
]
CHAT_REQUESTS = [
    "What do you think about that?",
    "Do you have any tips for me?",
    "Can you suggest something fun to do this weekend?",
    "How would you spend a rainy afternoon?",
    "What is a good way to stay motivated?",
    "Tell me something interesting, please.",
]


@register_task("conversation")
@dataclass
class Conversation(Task):
    """Multi-turn dialogues with facts early and questions about them later. Fields mirror
    conf/task/conversation.yaml.

    dialogues: dialogues generated from the seed; turns: user turns per dialogue (20, as KV-Direct's curve);
    facts: facts stated in turns 1..facts; questions: question turns, evenly spread over the turns after the
    facts (the last turn always asks); user_tokens: tokens per user message (padded with small talk);
    reply_tokens / answer_tokens: generation cap of chat / question turns; policy: over_budget | after_turn;
    compress_older_than: null or k >= 1 (the last k turns stay intact; see `kvbench.scenarios.conversation`).
    """

    scenario: ClassVar[str | None] = SCENARIO

    dialogues: int = field(default=2, metadata=AT_LEAST_ONE)
    turns: int = field(default=20, metadata=AT_LEAST_ONE)
    facts: int = field(default=2, metadata=AT_LEAST_ONE)
    questions: int = field(default=8, metadata=AT_LEAST_ONE)
    user_tokens: int = field(default=48, metadata=AT_LEAST_ONE)
    reply_tokens: int = field(default=12, metadata=AT_LEAST_ONE)
    answer_tokens: int = field(default=12, metadata=AT_LEAST_ONE)
    policy: str = "over_budget"
    compress_older_than: int | None = None
    seed: int = 42
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy '{self.policy}'. Valid policies: {', '.join(POLICIES)}.")
        if self.compress_older_than is not None and (
            isinstance(self.compress_older_than, bool) or int(self.compress_older_than) < 1
        ):
            raise ValueError(f"compress_older_than must be null or an int >= 1, got {self.compress_older_than!r}")
        if self.facts > len(FACTS):
            raise ValueError(f"facts={self.facts}: at most {len(FACTS)} fact kinds exist")
        if self.facts + self.questions > self.turns:
            raise ValueError(
                f"facts + questions = {self.facts + self.questions} > turns = {self.turns}; "
                "every fact and every question needs its own turn"
            )

    def samples(self, tokenizer: Any, max_context: int) -> Iterator[Sample]:
        return (planned.build() for planned in self.planned_samples(tokenizer, max_context))

    def planned_samples(self, tokenizer: Any, max_context: int) -> Iterator[PlannedSample]:
        for index in range(self.dialogues):
            sample_id = f"conversation-d{index}"
            yield PlannedSample(
                sample_id=sample_id,
                recipe=self.recipe(dialogue=index),
                build=lambda index=index: self.build(tokenizer, max_context, index),
            )

    def dialogue(self, tokenizer: Any, index: int) -> list[Turn]:
        """The turns of dialogue `index` (deterministic in the seed, the fields and the tokenizer)."""
        rng = random.Random(f"conversation-{self.seed}-{index}")
        kinds = rng.sample(range(len(FACTS)), self.facts)
        values = [FACTS[k][3](rng) for k in kinds]
        later = list(range(self.facts + 1, self.turns + 1))
        # Question turns evenly spread over the turns after the facts, the last turn included.
        step = len(later) / self.questions
        asking = {later[len(later) - 1 - round(i * step)] for i in range(self.questions)}
        order = [i % self.facts for i in range(self.questions)]
        rng.shuffle(order)
        asked = iter(order)
        turns = []
        for number in range(1, self.turns + 1):
            if number <= self.facts:
                statement, *_ = FACTS[kinds[number - 1]]
                head, tail, kind, prefix, answers, cap = (
                    statement.format(v=values[number - 1]),
                    "",
                    "fact",
                    "",
                    (),
                    self.reply_tokens,
                )
            elif number in asking:
                fact = next(asked)
                _, question, prefix, _ = FACTS[kinds[fact]]
                head, tail, kind, answers, cap = "", question, "question", (values[fact],), self.answer_tokens
            else:
                head, tail, kind, prefix, answers, cap = (
                    "",
                    rng.choice(CHAT_REQUESTS),
                    "chat",
                    "",
                    (),
                    self.reply_tokens,
                )
            user = self._pad(tokenizer, rng, head, tail)
            turns.append(Turn(number, kind, user, prefix, answers, cap))
        return turns

    def _pad(self, tokenizer: Any, rng: random.Random, head: str, tail: str) -> str:
        """`head` + small talk + `tail`, with small-talk sentences added while the message has < user_tokens."""
        talk: list[str] = []
        pool = list(SMALL_TALK)
        rng.shuffle(pool)

        def text() -> str:
            return " ".join(part for part in (head, *talk, tail) if part)

        while len(tokenizer(text(), add_special_tokens=False)["input_ids"]) < self.user_tokens:
            talk.append(pool[len(talk) % len(pool)])
        return text()

    def build(self, tokenizer: Any, max_context: int, index: int) -> Sample:
        turns = self.dialogue(tokenizer, index)
        pieces = dialogue_pieces(tokenizer, turns, self.use_chat_template)
        overflow = overflow_turn(pieces, turns, max_context)
        if overflow is not None:
            turn, total = overflow
            raise ValueError(
                f"conversation d{index} overflows the model's context of {max_context} tokens at turn {turn} "
                f"(up to {total} tokens by its end); use task.turns < {turn} or a smaller task.user_tokens"
            )
        questions = [t for t in turns if t.has_question]
        return Sample(
            sample_id=f"conversation-d{index}",
            # The whole dialogue is in the fingerprinted fields (meta is not): its text and its references.
            context="\n".join(t.user for t in turns),
            # ... and the settings that change the rows (meta is not fingerprinted).
            question=json.dumps(
                {
                    "policy": self.policy,
                    "compress_older_than": self.compress_older_than,
                    "answer_prefixes": [t.answer_prefix for t in questions],
                },
                sort_keys=True,
            ),
            answer_prefix="",
            answers=[a for t in questions for a in t.answers],
            metric="string_match_all",
            max_new_tokens=max(t.max_new_tokens for t in turns),
            use_chat_template=self.use_chat_template,
            meta={
                SCENARIO_KEY: SCENARIO,
                "subtask": "conversation",
                "dialogue": index,
                "turns": [t.as_dict() for t in turns],
                "policy": self.policy,
                "compress_older_than": self.compress_older_than,
                "max_conversation_tokens": pieces.tokens_by_turn(turns)[-1],
            },
        )
