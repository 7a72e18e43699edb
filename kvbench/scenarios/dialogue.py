"""A dialogue as the token stream one KV cache sees: per-turn user pieces, the assistant's end-of-turn piece.

The conversation scenario appends, turn after turn, the user message (chat-templated, up to and including the
assistant turn start and the turn's answer prefix), then the generated answer, then the template's end of the
assistant turn. The pieces are cut from the model's own chat template by rendering the dialogue with a marker as
every assistant answer and taking text differences, so they do not depend on what the model generates: the task
tokenises them offline and knows, before any model work, at which turn a dialogue overflows the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCENARIO = "conversation"
POLICIES = ("over_budget", "after_turn")  # when the cache is compressed (`kvbench.scenarios.conversation`)
ANSWER_MARKER = "ANSWER_MARKER_KVBENCH"  # stands for a generated answer when rendering the template
PLAIN_USER, PLAIN_ASSISTANT, PLAIN_END = "User: ", "\nAssistant: ", "\n\n"  # models without a chat template


@dataclass(frozen=True)
class Turn:
    """One user turn: its message, the answer prefix (question turns) and the references (empty: no question)."""

    index: int  # 1-based
    kind: str  # fact | chat | question
    user: str
    answer_prefix: str
    answers: tuple[str, ...]
    max_new_tokens: int

    @property
    def has_question(self) -> bool:
        return bool(self.answers)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "user": self.user,
            "answer_prefix": self.answer_prefix,
            "answers": list(self.answers),
            "max_new_tokens": self.max_new_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Turn:
        return cls(**{**data, "answers": tuple(data["answers"])})


@dataclass(frozen=True)
class Pieces:
    """Token ids of each turn's user piece and of the end-of-turn piece appended after every answer."""

    user: list[list[int]]
    end_of_turn: list[int]

    def appended_end(self, last_token: int) -> list[int]:
        """The end-of-turn ids still to append after an answer ending with `last_token` (a generated end-of-turn
        token, e.g. ChatML's <|im_end|> as EOS, is not appended twice)."""
        end = self.end_of_turn
        return end[1:] if end and last_token == end[0] else list(end)

    def tokens_by_turn(self, turns: list[Turn]) -> list[int]:
        """Upper bound of the conversation's length (tokens) at the end of each turn: every answer at its maximum."""
        total, ends = 0, []
        for index, (piece, turn) in enumerate(zip(self.user, turns, strict=True)):
            total += (len(self.end_of_turn) if index else 0) + len(piece) + turn.max_new_tokens
            ends.append(total)
        return ends


def templated(tokenizer: Any, use_chat_template: bool) -> bool:
    return bool(use_chat_template and getattr(tokenizer, "chat_template", None))


def dialogue_pieces(tokenizer: Any, turns: list[Turn], use_chat_template: bool = True) -> Pieces:
    """Cut the dialogue into the pieces the cache is fed (see the module docstring)."""
    if not templated(tokenizer, use_chat_template):
        user = [
            tokenizer(PLAIN_USER + t.user + PLAIN_ASSISTANT + t.answer_prefix, add_special_tokens=i == 0)["input_ids"]
            for i, t in enumerate(turns)
        ]
        return Pieces(user, tokenizer(PLAIN_END, add_special_tokens=False)["input_ids"])

    def render(messages: list[dict[str, str]], open_turn: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)

    history: list[dict[str, str]] = []
    rendered, texts, end_text = "", [], None
    for turn in turns:
        history.append({"role": "user", "content": turn.user})
        text = render(history, True)
        if not text.startswith(rendered):
            raise ValueError(
                "this tokenizer's chat template re-renders earlier turns; a growing cache needs one that only appends"
            )
        texts.append(text[len(rendered) :] + turn.answer_prefix)
        history.append({"role": "assistant", "content": ANSWER_MARKER})
        closed = render(history, False)
        end_text = closed[closed.rindex(ANSWER_MARKER) + len(ANSWER_MARKER) :]
        rendered = closed
    # Chat templates spell BOS and special tokens as text: no tokenizer specials (as `kvbench.harness.prompt` does).
    user = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return Pieces(user, tokenizer(end_text or "", add_special_tokens=False)["input_ids"])


def overflow_turn(pieces: Pieces, turns: list[Turn], max_context: int) -> tuple[int, int] | None:
    """(turn index, tokens by its end) of the first turn whose end may exceed `max_context`, or None."""
    for turn, total in zip(turns, pieces.tokens_by_turn(turns), strict=True):
        if total > max_context:
            return turn.index, total
    return None
