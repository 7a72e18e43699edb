"""RULER's synthetic generators (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?", NVIDIA/RULER scripts/data/synthetic), re-implemented for kvbench.

Every generator turns (sample seed, sample index, haystack size) into a `Draft`: the same seed and size always
give the same text, and a larger size only adds haystack, so `kvbench.tasks.ruler` can binary-search the size
that fills a target token length. What a "size" counts depends on the family: noise blocks, essay words or
filler needles (niah), noise blocks (vt), distinct words (cwe), nominal words (fwe), documents (qa).

The task templates and answer prefixes below reproduce the wording of RULER's task definitions
(NVIDIA/RULER, Apache-2.0), split into kvbench's context / question / answer prefix: the instruction that opens
a RULER prompt stays with the context, the query sentence is the question.

Deliberate differences from the reference scripts: sentences of the essay haystack are split by a regex
(RULER uses nltk's punkt), NIAH keys are adjective-noun pairs from `tasks/words/` (RULER: wonderwords pairs),
filler needles never reuse a real needle's key, and cwe words come from the wonderwords lists shipped by the
`wonderwords` package, with random adjective-noun pairs added only if a list longer than those ~8,000 words is
needed (RULER switches to another English word list there, at ~128K tokens).
"""

from __future__ import annotations

import functools
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbench.engine.hub import essay_text, package_dir
from kvbench.tasks.haystack import NOISE_SENTENCES, random_key, random_number

# RULER draws needle depths (percent of the haystack) from 40 evenly spaced values.
DEPTHS: tuple[int, ...] = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)))

# --- Templates: wording from NVIDIA/RULER scripts/data/synthetic/constants.py (Apache-2.0). ---
NIAH_INTRO = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards."
)
NIAH_QUESTION = "What are all the special magic {kind} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = "The special magic {kind} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."

VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
VT_ANSWER_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assigned the value {query}, they are:"
)

CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
CWE_QUESTION = "Question: What are the {num_cw} most common words in the above list?"
CWE_ANSWER_PREFIX = "Answer: The top {num_cw} words that appear most often in the list are:"

FWE_INTRO = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words."
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"

QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
QA_DOCUMENTS_INTRO = "The following are given documents."
QA_DOCUMENT = "Document {i}:\n{document}"
QA_QUESTION = "Question: {query}"
QA_ANSWER_PREFIX = "Answer:"


@dataclass
class Draft:
    """One generated RULER item before it becomes a Sample."""

    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


class Generator:
    """A RULER task family; `draft` must be a pure function of its arguments."""

    min_size: int = 1  # the smallest haystack size the generator accepts

    def draft(self, seed: str, index: int, size: int) -> Draft:
        raise TypeError(f"{type(self).__name__} does not define draft()")


# --------------------------------------------------------------------------------------------- shared helpers
def singular(text: str) -> str:
    """RULER's rewording of its NIAH template when a single value is asked for (same replacements, same order)."""
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def random_uuid(rng: random.Random) -> str:
    """A uuid4 drawn from `rng` (uuid.uuid4() would not be reproducible)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return random_number(rng, 7)
    if kind == "words":
        return random_key(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise ValueError(f"unknown needle type '{kind}'. Valid needle types: numbers, uuids, words.")


def prefix_sample(rng: random.Random, population: Sequence[Any], k: int) -> list[Any]:
    """k distinct items by a partial Fisher-Yates shuffle: the first k items do not depend on how many are drawn,
    so a larger haystack keeps the smaller one's choices (the token count then grows monotonically)."""
    items = list(population)
    if k > len(items):
        raise ValueError(f"cannot draw {k} distinct items from {len(items)}")
    for i in range(k):
        j = rng.randrange(i, len(items))
        items[i], items[j] = items[j], items[i]
    return items[:k]


def split_sentences(text: str) -> list[str]:
    """Sentences of plain English prose: split after . ! ? followed by whitespace and an upper-case letter,
    a digit or an opening quote/bracket."""
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])", text.strip()) if s]


@functools.lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    return tuple(essay_text().split())


def essay_prefix(num_words: int) -> str:
    """The first `num_words` words of the essays (repeated when more are asked for), single-spaced."""
    words = essay_words()
    repeats = max(1, -(-num_words // len(words)))
    return " ".join((words * repeats)[:num_words]) if repeats > 1 else " ".join(words[:num_words])


def insert_between_sentences(text: str, inserts: Sequence[str], depths: Sequence[int]) -> str:
    """Insert each item at `depth`% of the sentences (RULER's essay insertion; depths are sorted first)."""
    sentences = split_sentences(text)
    cuts = [0] + sorted(int(len(sentences) * depth / 100) for depth in depths) + [len(sentences)]
    parts: list[str] = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sentences[cuts[i - 1] : cuts[i]]))
        if i - 1 < len(inserts):
            parts.append(inserts[i - 1])
    return " ".join(part for part in parts if part)


def insert_lines(lines: list[str], inserts: Sequence[str], rng: random.Random) -> tuple[list[str], list[float]]:
    """Insert items at random line slots, in order (RULER's noise/needle insertion); returns the lines and each
    item's depth in percent of the original lines."""
    slots = sorted(rng.sample(range(len(lines)), len(inserts)))
    out = list(lines)
    for shift, (slot, item) in enumerate(zip(slots, inserts, strict=True)):
        out.insert(slot + shift, item)
    return out, [round(100 * slot / len(lines), 1) for slot in slots]


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha) for alpha > 1 (Euler-Maclaurin tail; exact to ~1e-12 with 1000 terms)."""
    if alpha <= 1:
        raise ValueError(f"fwe needs alpha > 1, got {alpha}")
    head = sum(k**-alpha for k in range(1, terms))
    n = float(terms)
    return head + n ** (1 - alpha) / (alpha - 1) + n**-alpha / 2 + alpha * n ** (-alpha - 1) / 12


@functools.lru_cache(maxsize=1)
def common_word_pool() -> tuple[str, ...]:
    """The wonderwords noun, adjective and verb lists (RULER's cwe vocabulary), sorted and de-duplicated."""
    folder = package_dir("wonderwords", "pip install wonderwords==3.0.1") / "assets"
    words: set[str] = set()
    for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt"):
        words.update(w.strip() for w in (folder / name).read_text(encoding="utf-8").splitlines() if w.strip())
    return tuple(sorted(words))


# ------------------------------------------------------------------------------------------------------ NIAH
@dataclass
class NiahGenerator(Generator):
    """Needle(s) "One of the special magic {values} for {key} is: {value}." in a noise, essay or needle haystack;
    size = noise blocks / essay words / filler needles."""

    haystack: str
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1

    def __post_init__(self) -> None:
        if self.haystack not in ("noise", "essay", "needle"):
            raise ValueError(f"unknown haystack '{self.haystack}'. Valid haystacks: essay, needle, noise.")
        self.num_keys = max(self.num_keys, self.num_queries)
        self.min_size = self.num_keys * self.num_values

    def draft(self, seed: str, index: int, size: int) -> Draft:
        rng = random.Random(seed)
        keys: list[str] = []
        while len(keys) < self.num_keys:
            key = random_value(rng, self.key_type)
            if key not in keys:
                keys.append(key)
        values = [[random_value(rng, self.value_type) for _ in range(self.num_values)] for _ in keys]
        kind = self.value_type
        needles = [
            (k, v, NIAH_NEEDLE.format(kind=kind, key=keys[k], value=v)) for k in range(len(keys)) for v in values[k]
        ]
        rng.shuffle(needles)
        queried = rng.sample(range(self.num_keys), self.num_queries)
        answers = [v for k in queried for v in values[k]]
        query_keys = [keys[k] for k in queried]
        query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]

        texts = [text for _, _, text in needles]
        if self.haystack == "essay":
            depths: list[float] = sorted(rng.sample(DEPTHS, len(needles)))
            haystack = insert_between_sentences(essay_prefix(size), texts, depths)
        else:
            if self.haystack == "noise":
                lines = [NOISE_SENTENCES] * size
            else:
                lines = []
                while len(lines) < size:
                    key = random_value(rng, self.key_type)
                    if key not in keys:
                        lines.append(NIAH_NEEDLE.format(kind=kind, key=key, value=random_value(rng, self.value_type)))
            line_list, depths = insert_lines(lines, texts, rng)
            haystack = "\n".join(line_list)

        intro, question, prefix = NIAH_INTRO, NIAH_QUESTION, NIAH_ANSWER_PREFIX
        if self.num_queries * self.num_values == 1:
            intro, question, prefix, kind = singular(intro), singular(question), singular(prefix), kind[:-1]
        answer_depths = [depths[i] for i, (k, _, _) in enumerate(needles) if k in queried]
        return Draft(
            context=intro.format(kind=kind) + "\n" + haystack,
            question=question.format(kind=kind, query=query),
            answer_prefix=prefix.format(kind=kind, query=query),
            answers=answers,
            meta={
                "haystack": self.haystack,
                "haystack_size": size,
                "depth": answer_depths[0],
                "answer_depths": answer_depths,
                "needle_depths": list(depths),
                "keys": keys,
                "query_keys": query_keys,
            },
        )


# -------------------------------------------------------------------------------------------------------- VT
@dataclass
class VariableTrackingGenerator(Generator):
    """Variable tracking: a chain "VAR A = 12345", "VAR B = VAR A", ... hidden in noise blocks, preceded by a
    one-shot example (3-letter names, ~500 tokens); the answer is every name in the chain. size = noise blocks."""

    icl_blocks: int
    num_chains: int = 1
    num_hops: int = 4
    name_length: int = 5

    def __post_init__(self) -> None:
        self.min_size = self.num_chains * (self.num_hops + 1)

    def chains(self, rng: random.Random, name_length: int) -> tuple[list[list[str]], list[list[str]]]:
        names: list[str] = []
        while len(names) < self.num_chains * (self.num_hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
            if name not in names:
                names.append(name)
        groups = [names[i : i + self.num_hops + 1] for i in range(0, len(names), self.num_hops + 1)]
        chains = []
        for group in groups:
            value = str(rng.randint(10000, 99999))
            hops = [f"VAR {b} = VAR {a}" for a, b in zip(group, group[1:], strict=False)]
            chains.append([f"VAR {group[0]} = {value}", *hops])
        return groups, chains

    def text(self, rng: random.Random, blocks: int, name_length: int) -> tuple[str, str, list[str], list[float]]:
        """Haystack with the chains inserted in order; returns (haystack, value, names of chain 0, depths)."""
        groups, chains = self.chains(rng, name_length)
        lines = [NOISE_SENTENCES] * blocks
        depths: list[float] = []
        for chain in chains:
            lines, chain_depths = insert_lines(lines, chain, rng)
            depths.extend(chain_depths)
        value = chains[0][0].split("=")[-1].strip()
        return "\n".join(lines), value, groups[0], depths

    def example(self, rng: random.Random, blocks: int) -> str:
        haystack, value, names, _ = self.text(rng, blocks, 3)
        num_v = self.num_hops + 1
        return (
            f"{VT_INTRO}\n\n{haystack}\n{VT_QUESTION.format(query=value)} "
            f"{VT_ANSWER_PREFIX.format(num_v=num_v, query=value)} {' '.join(names)}"
        )

    def draft(self, seed: str, index: int, size: int) -> Draft:
        rng = random.Random(seed)
        example = self.example(rng, self.icl_blocks)
        haystack, value, names, depths = self.text(rng, size, self.name_length)
        num_v = self.num_hops + 1
        return Draft(
            context=f"{example}\n\n{VT_INTRO}\n\n{haystack}",
            question=VT_QUESTION.format(query=value),
            answer_prefix=VT_ANSWER_PREFIX.format(num_v=num_v, query=value),
            answers=names,
            meta={
                "haystack": "noise",
                "haystack_size": size,
                "depth": depths[0],
                "answer_depths": depths,
                "value": value,
                "icl_blocks": self.icl_blocks,
            },
        )


# ------------------------------------------------------------------------------------------------------- CWE
@dataclass
class CommonWordsGenerator(Generator):
    """Common words extraction: a numbered list where `num_common` words appear `common_repeats` times and the
    others `uncommon_repeats` times, after a one-shot example; answer = the common words. size = distinct words."""

    common_repeats: int = 30
    uncommon_repeats: int = 3
    num_common: int = 10
    example_words: int = 40
    example_repeats: tuple[int, int] = (10, 3)

    def __post_init__(self) -> None:
        self.min_size = self.num_common + 1

    @classmethod
    def for_length(cls, length: int) -> CommonWordsGenerator:
        """RULER's settings: x30 / x3 with a 40-word example, or x6 / x1 with a 20-word example under 4K."""
        if length < 4096:
            return cls(common_repeats=6, uncommon_repeats=1, example_words=20, example_repeats=(3, 1))
        return cls()

    def words(self, rng: random.Random, count: int) -> list[str]:
        pool = common_word_pool()
        if count <= len(pool):
            return prefix_sample(rng, pool, count)
        words = prefix_sample(rng, pool, len(pool))
        taken = set(words)
        while len(words) < count:
            extra = random_key(rng)
            if extra not in taken:
                taken.add(extra)
                words.append(extra)
        return words

    def numbered_list(self, rng: random.Random, count: int, repeats: tuple[int, int]) -> tuple[str, list[str]]:
        words = self.words(rng, count)
        common, uncommon = words[: self.num_common], words[self.num_common :]
        entries = common * repeats[0] + uncommon * repeats[1]
        rng.shuffle(entries)
        return " ".join(f"{i + 1}. {word}" for i, word in enumerate(entries)), common

    def draft(self, seed: str, index: int, size: int) -> Draft:
        rng = random.Random(seed)
        question = CWE_QUESTION.format(num_cw=self.num_common)
        prefix = CWE_ANSWER_PREFIX.format(num_cw=self.num_common)
        example_list, example_common = self.numbered_list(rng, self.example_words, self.example_repeats)
        example_answer = " ".join(f"{i + 1}. {word}" for i, word in enumerate(example_common))
        example = f"{CWE_INTRO}\n{example_list}\n{question} {prefix} {example_answer}"
        word_list, common = self.numbered_list(rng, size, (self.common_repeats, self.uncommon_repeats))
        entries = self.num_common * self.common_repeats + (size - self.num_common) * self.uncommon_repeats
        return Draft(
            context=f"{example}\n{CWE_INTRO}\n{word_list}",
            question=question,
            answer_prefix=prefix,
            answers=common,
            meta={
                "num_words": size,
                "list_entries": entries,
                "common_repeats": self.common_repeats,
                "uncommon_repeats": self.uncommon_repeats,
            },
        )


# ------------------------------------------------------------------------------------------------------- FWE
@dataclass
class FrequentWordsGenerator(Generator):
    """Frequent words extraction: random 6-letter coded words with Zipf counts int(size * k^-alpha / zeta(alpha));
    rank 1 is the noise word '...', the answer is ranks 2-4. size = nominal number of words."""

    vocab_size: int
    alpha: float = 2.0
    word_length: int = 6

    def __post_init__(self) -> None:
        if self.vocab_size < 5:
            raise ValueError(f"fwe needs a vocabulary of at least 5 words, got {self.vocab_size}")
        self.norm = zeta(self.alpha)
        # The answer must be well defined: rank 4 strictly more frequent than rank 5.
        self.min_size = next(n for n in range(1, 10**6) if self.counts(n)[3] > self.counts(n)[4])

    @classmethod
    def for_length(cls, length: int, max_new_tokens: int, alpha: float = 2.0) -> FrequentWordsGenerator:
        """RULER's vocabulary: one coded word per 50 tokens of input budget."""
        return cls(vocab_size=max(5, (length - max_new_tokens) // 50), alpha=alpha)

    def counts(self, size: int) -> list[int]:
        return [int(size * k**-self.alpha / self.norm) for k in range(1, self.vocab_size + 1)]

    def draft(self, seed: str, index: int, size: int) -> Draft:
        rng = random.Random(seed)
        vocab: set[str] = set()
        while len(vocab) < self.vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=self.word_length)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."  # the most frequent "word" is noise
        counts = self.counts(size)
        words = [word for word, count in zip(ranked, counts, strict=True) for _ in range(count)]
        rng.shuffle(words)
        return Draft(
            context=f"{FWE_INTRO} {' '.join(words)}",
            question=FWE_QUESTION,
            answer_prefix=FWE_ANSWER_PREFIX,
            answers=ranked[1:4],
            meta={"num_words": size, "vocab_size": self.vocab_size, "top_counts": counts[:5], "alpha": self.alpha},
        )


# -------------------------------------------------------------------------------------------------------- QA
@dataclass(frozen=True)
class QAItem:
    query: str
    answers: list[str]
    gold: list[int]  # indices into QAData.docs: the documents that come with the question
    related: list[int] = field(default_factory=list)  # same-article paragraphs, preferred as distractors
    supporting: list[int] = field(default_factory=list)  # the gold documents that hold the answer


@dataclass(frozen=True)
class QAData:
    name: str
    items: list[QAItem]
    docs: list[str]


@dataclass
class QAGenerator(Generator):
    """Question answering over gold documents hidden among distractors (same-article paragraphs first, then
    random documents), shuffled; sample i asks the dataset's i-th question. size = documents."""

    data: QAData

    def __post_init__(self) -> None:
        if not self.data.items:
            raise ValueError(f"{self.data.name}: no answerable questions")
        self.min_size = max(len(item.gold) for item in self.data.items)

    def documents(self, rng: random.Random, item: QAItem, size: int) -> list[int]:
        docs = self.data.docs
        if size >= len(docs):
            return (list(range(len(docs))) * -(-size // len(docs)))[:size]
        chosen = list(item.gold)
        extra = size - len(chosen)
        related = prefix_sample(rng, item.related, len(item.related))
        chosen += related[:extra]
        taken = set(chosen)
        while len(chosen) < size:
            j = rng.randrange(len(docs))
            if j not in taken:
                taken.add(j)
                chosen.append(j)
        return chosen

    def draft(self, seed: str, index: int, size: int) -> Draft:
        rng = random.Random(seed)
        item = self.data.items[index % len(self.data.items)]
        order = self.documents(rng, item, size)
        rng.shuffle(order)
        body = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=self.data.docs[d]) for i, d in enumerate(order))
        supporting = set(item.supporting or item.gold)
        gold_positions = [i for i, d in enumerate(order) if d in supporting]
        gold_depths = [round(100 * i / max(1, len(order) - 1), 1) for i in gold_positions]
        return Draft(
            context=f"{QA_INSTRUCTION}\n\n{QA_DOCUMENTS_INTRO}\n\n{body}",
            question=f"{QA_INSTRUCTION}\n\n{QA_QUESTION.format(query=item.query)}",
            answer_prefix=QA_ANSWER_PREFIX,
            answers=list(item.answers),
            meta={
                "dataset": self.data.name,
                "question_index": index % len(self.data.items),
                "num_docs": size,
                "gold_positions": gold_positions,
                "depth": gold_depths[0] if gold_depths else None,
                "answer_depths": gold_depths,
            },
        )


# ------------------------------------------------------------------------------------- the 13 RULER subtasks
GENERATION_LENGTHS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}

NIAH_SUBTASKS: dict[str, dict[str, Any]] = {
    "niah_single_1": {"haystack": "noise"},
    "niah_single_2": {"haystack": "essay"},
    "niah_single_3": {"haystack": "essay", "value_type": "uuids"},
    "niah_multikey_1": {"haystack": "essay", "num_keys": 4},
    "niah_multikey_2": {"haystack": "needle"},
    "niah_multikey_3": {"haystack": "needle", "key_type": "uuids", "value_type": "uuids"},
    "niah_multivalue": {"haystack": "essay", "num_values": 4},
    "niah_multiquery": {"haystack": "essay", "num_queries": 4},
}
QA_SUBTASKS = {"qa_1": "squad", "qa_2": "hotpotqa"}
SUBTASKS: tuple[str, ...] = (*NIAH_SUBTASKS, "vt", "cwe", "fwe", *QA_SUBTASKS)


def family(subtask: str) -> str:
    if subtask in NIAH_SUBTASKS:
        return "niah"
    if subtask in QA_SUBTASKS:
        return "qa"
    return subtask


def metric_for(subtask: str) -> str:
    return "string_match_part" if family(subtask) == "qa" else "string_match_all"


def separator_for(subtask: str) -> str:
    """How RULER's templates join the context and the question: one newline, two for qa."""
    return "\n\n" if family(subtask) == "qa" else "\n"


def make_generator(
    subtask: str,
    length: int,
    count_tokens: Callable[[str], int],
    qa_data: QAData | None = None,
    icl_tokens: int = 500,
) -> Generator:
    """The generator of `subtask` at target `length`; `count_tokens` counts raw text tokens (vt sizes its
    one-shot example with it, to at most `icl_tokens`)."""
    kind = family(subtask)
    if kind == "niah":
        return NiahGenerator(**NIAH_SUBTASKS[subtask])
    if kind == "vt":
        # RULER's example takes ~500 tokens; below 2K tokens (shorter than RULER goes) it takes a quarter.
        return VariableTrackingGenerator(icl_blocks=vt_example_blocks(count_tokens, min(icl_tokens, length // 4)))
    if kind == "cwe":
        return CommonWordsGenerator.for_length(length)
    if kind == "fwe":
        return FrequentWordsGenerator.for_length(length, GENERATION_LENGTHS["fwe"])
    if kind == "qa":
        if qa_data is None:
            raise ValueError(f"{subtask} needs its QA data set")
        return QAGenerator(qa_data)
    raise ValueError(f"unknown RULER subtask '{subtask}'. Valid subtasks: {', '.join(SUBTASKS)}.")


def vt_example_blocks(count_tokens: Callable[[str], int], max_tokens: int) -> int:
    """Noise blocks of vt's one-shot example so that it takes at most `max_tokens` tokens (RULER: 500)."""
    probe = VariableTrackingGenerator(icl_blocks=0)
    blocks = probe.min_size

    def tokens(n: int) -> int:
        return count_tokens(probe.example(random.Random("vt-example"), n))

    while tokens(blocks + 1) <= max_tokens:
        blocks += 1
    return blocks
