"""Text metrics of LongBench v1 and InfiniteBench, registered in `METRICS` as fn(prediction, references) -> [0, 1].

LongBench (THUDM/LongBench `metrics.py` + `eval.py`): qa_f1, qa_f1_zh, rouge_l, rouge_zh, classification,
retrieval_en, retrieval_zh, count, code_sim. A prediction's score is the MAX over its references, and the
optional `first_line` rule (trec, triviaqa, samsum, lsht) scores only the first line of the prediction.

InfiniteBench (OpenBMB/InfiniteBench `src/compute_scores.py`): infbench_first_int (passkey, number_string),
infbench_kv (kv_retrieval), qa_f1 (longbook_qa_eng), infbench_qa_f1_zh (longbook_qa_chn, character F1),
rouge_lsum (longbook_sum_eng), infbench_choice (longbook_choice_eng), infbench_code_debug,
infbench_dialogue (longdialogue_qa_eng), infbench_math_find, infbench_math_calc, infbench_code_run.

The benchmarks report these x100; kvbench keeps [0, 1] and leaves the scaling to presentation.

Metrics that need more than (prediction, references), e.g. LongBench's `classification` (the class names of
the data set) or the first-line rule, take keyword parameters. `bind_metric(name, **params)` registers the
metric with its parameters bound under a derived, deterministic name such as
`classification[all_classes=#1a2b3c4d,first_line=True]` and returns that name, which a `Sample` carries in
its `metric` field. The core `score(metric, prediction, references)` call stays as it is; the name is stable
across processes, so result keys and resumes are unaffected, and the parameters enter the sample's
fingerprint through the name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from kvbench.harness.metrics import METRICS

ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼"
    "］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖"
    "〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ALL_PUNCTUATION = frozenset(string.punctuation + ZH_PUNCTUATION)
_ASCII_PUNCTUATION = frozenset(string.punctuation)


# ---------------------------------------------------------------- helpers


def first_line_of(prediction: str) -> str:
    """LongBench's rule for few-shot tasks: the first line after leading newlines."""
    return prediction.lstrip("\n").split("\n")[0]


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, drop ASCII punctuation, articles and extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lowercase, drop ASCII and Chinese punctuation and all whitespace."""
    return "".join(ch for ch in text.lower() if ch not in _ALL_PUNCTUATION and not ch.isspace())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    common = Counter(prediction) & Counter(reference)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(reference)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=1)
def _jieba() -> Any:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # it logs the dictionary build at DEBUG level on first use
    return jieba


def jieba_tokens(text: str) -> list[str]:
    return list(_jieba().cut(text, cut_all=False))


class _WhitespaceTokenizer:
    """rouge-score tokenizer for pre-segmented text (its default drops every non-ASCII character)."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@functools.lru_cache(maxsize=4)
def _rouge_scorer(kind: str, whitespace: bool) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], tokenizer=_WhitespaceTokenizer() if whitespace else None)


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+", text)


def _require_references(name: str, references: Sequence[str]) -> None:
    if not references:
        raise ValueError(f"metric {name} needs at least one reference")


def best_over_references(name: str) -> Callable:
    """Register fn(prediction, reference, **params) -> float as metric `name`: the max over the references,
    after LongBench's optional first-line rule (keyword `first_line`)."""

    def decorator(fn: Callable[..., float]) -> Callable[..., float]:
        @functools.wraps(fn)
        def metric(prediction: str, references: Sequence[str], *, first_line: bool = False, **params) -> float:
            _require_references(name, references)
            if first_line:
                prediction = first_line_of(prediction)
            return max(float(fn(prediction, reference, **params)) for reference in references)

        METRICS.register(name)(metric)
        return fn

    return decorator


def bind_metric(name: str, **params: Any) -> str:
    """Register metric `name` with `params` bound (once) and return the derived name a Sample carries.

    Scalars appear in the name as `key=value`; lists and dicts as `key=#<hash>` (a hash of their JSON form).
    """
    base = METRICS.get(name)
    if not params:
        return name
    parts = []
    for key in sorted(params):
        value = params[key]
        if isinstance(value, (list, tuple, dict)):
            text = json.dumps(value, sort_keys=True, ensure_ascii=False)
            parts.append(f"{key}=#{hashlib.sha256(text.encode()).hexdigest()[:8]}")
        else:
            parts.append(f"{key}={value}")
    bound = f"{name}[{','.join(parts)}]"
    if bound not in METRICS:
        METRICS.register(bound)(functools.partial(base, **params))
    return bound


# ---------------------------------------------------------------- LongBench


@best_over_references("qa_f1")
def qa_f1(prediction: str, reference: str) -> float:
    """Token F1 after SQuAD normalisation (LongBench single/multi-doc QA, triviaqa; InfiniteBench En.QA)."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


@best_over_references("qa_f1_zh")
def qa_f1_zh(prediction: str, reference: str) -> float:
    """Token F1 over jieba words with Chinese normalisation per word (LongBench multifieldqa_zh)."""

    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in jieba_tokens(text)) if w]

    return token_f1(words(prediction), words(reference))


@best_over_references("rouge_l")
def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score, default tokenizer) (LongBench gov_report, qmsum, multi_news, samsum)."""
    return _rouge_scorer("rougeL", False).score(reference, prediction)["rougeL"].fmeasure


@best_over_references("rouge_zh")
def rouge_zh(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over jieba words (LongBench dureader, vcsum)."""
    scorer = _rouge_scorer("rougeL", True)
    return scorer.score(" ".join(jieba_tokens(reference)), " ".join(jieba_tokens(prediction)))["rougeL"].fmeasure


@best_over_references("classification")
def classification(prediction: str, reference: str, *, all_classes: Sequence[str]) -> float:
    """LongBench trec/lsht: class names found in the prediction, minus those that are only part of the gold
    name; 1/len(matches) if the gold is among them, else 0."""
    matches = [name for name in all_classes if name in prediction]
    # A class name inside the gold name (e.g. 'Date' in 'Date of birth') does not count against the gold.
    # The reference loop removes items from the list it iterates over, which can skip such a name when two
    # of them are adjacent; this is the intended rule, applied to every match.
    matches = [name for name in matches if not (name in reference and name != reference)]
    return 1.0 / len(matches) if reference in matches else 0.0


def _retrieval(prediction: str, reference: str, pattern: str) -> float:
    found = re.findall(pattern, reference)
    if not found:
        raise ValueError(f"retrieval reference {reference!r} does not match {pattern!r}")
    numbers = _numbers(prediction)
    return sum(n == found[0] for n in numbers) / len(numbers) if numbers else 0.0


@best_over_references("retrieval_en")
def retrieval_en(prediction: str, reference: str) -> float:
    """LongBench passage_retrieval_en: share of the numbers in the prediction equal to the gold paragraph's."""
    return _retrieval(prediction, reference, r"Paragraph (\d+)")


@best_over_references("retrieval_zh")
def retrieval_zh(prediction: str, reference: str) -> float:
    """LongBench passage_retrieval_zh: as retrieval_en with the gold written '段落N'."""
    return _retrieval(prediction, reference, r"段落(\d+)")


@best_over_references("count")
def count(prediction: str, reference: str) -> float:
    """LongBench passage_count: share of the numbers in the prediction equal to the gold count."""
    numbers = _numbers(prediction)
    return sum(n == str(reference) for n in numbers) / len(numbers) if numbers else 0.0


@best_over_references("code_sim")
def code_sim(prediction: str, reference: str) -> float:
    """LongBench lcc/repobench-p: fuzzy ratio (rapidfuzz, /100) of the first prediction line that is not a
    comment or code fence (no '`', '#' or '//') against the reference line."""
    from rapidfuzz import fuzz

    line = next(
        (ln for ln in prediction.lstrip("\n").split("\n") if "`" not in ln and "#" not in ln and "//" not in ln), ""
    )
    return fuzz.ratio(line, reference) / 100


# ---------------------------------------------------------------- InfiniteBench


def _first_int(text: str) -> str:
    return next((part for part in re.split(r"[^0-9]", text) if part), "")


def _blank_out(text: str, tokens: Sequence[str]) -> str:
    for token in tokens:
        text = text.replace(token, " ")
    return text


def _words_without(text: str, characters: str) -> list[str]:
    return _blank_out(text, characters).split()


def _single_spaced(text: str) -> str:
    while "  " in text:
        text = text.replace("  ", " ")
    return text


@best_over_references("infbench_first_int")
def infbench_first_int(prediction: str, reference: str) -> float:
    """InfiniteBench passkey / number_string: the first run of digits in the prediction equals the label."""
    return float(_first_int(prediction) == str(reference))


@best_over_references("infbench_kv")
def infbench_kv(prediction: str, reference: str) -> float:
    """InfiniteBench kv_retrieval: the label is one of the prediction's words (split on whitespace and
    newline : " ' . , ? ! { })."""
    return float(reference in _words_without(prediction, "\n:\"'.,?!{}"))


@best_over_references("infbench_qa_f1_zh")
def infbench_qa_f1_zh(prediction: str, reference: str) -> float:
    """InfiniteBench longbook_qa_chn: F1 over characters after Chinese normalisation."""
    return token_f1(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(reference)))


@best_over_references("rouge_lsum")
def rouge_lsum(prediction: str, reference: str) -> float:
    """InfiniteBench longbook_sum_eng: ROUGE-Lsum F-measure (rouge-score; sentences split on newlines), what
    InfiniteBench's `evaluate.load("rouge")` computes."""
    return _rouge_scorer("rougeLsum", False).score(reference, prediction)["rougeLsum"].fmeasure


def _text_after_first_prefix(pred: str, prefixes: Sequence[str]) -> str | None:
    """InfiniteBench's answer extraction: the text after the first listed prefix found in `pred` (skipping the
    character that follows it); "" if nothing follows it; None if no prefix occurs."""
    for prefix in prefixes:
        idx = pred.find(prefix)
        if idx != -1:
            return pred[idx + len(prefix) + 1 :]
    return None


@METRICS.register("infbench_choice")
def infbench_choice(prediction: str, references: Sequence[str]) -> float:
    """InfiniteBench longbook_choice_eng. References: the correct option's text and its letter (any order).

    A leading A-D letter decides; else the whole prediction equal to a reference; else the text after
    'answer is:', 'answer:', 'answer is' or 'option is' starting with a reference; else the first word that
    is a substring of 'ABCD'.
    """
    _require_references("infbench_choice", references)
    labels = [str(r) for r in references]
    pred = prediction.strip()
    if not pred:
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in labels)
    if pred in labels:
        return 1.0
    pred = _single_spaced(_blank_out(pred, "\n\"'.,?!{}"))
    after = _text_after_first_prefix(pred, ("answer is:", "answer:", "answer is", "option is"))
    if after is not None:
        return float(any(after.startswith(label) for label in labels))
    for word in pred.split():
        if word in "ABCD":
            return float(word in labels)
    return 0.0


@METRICS.register("infbench_code_debug")
def infbench_code_debug(prediction: str, references: Sequence[str]) -> float:
    """InfiniteBench code_debug. References: [function name, option letter].

    'X.' or 'X:' at the start decides; else the text after the first of 'answer is:', 'is:', 'answer:',
    'correct option is:' must start with the letter or the function name.
    """
    if len(references) != 2:
        raise ValueError(f"infbench_code_debug needs [function name, option letter], got {list(references)}")
    name, letter = str(references[0]), str(references[1])
    pred = prediction.strip()
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    pred = _single_spaced(_blank_out(pred, ("\n", "`", "'", '"', "-", "*", "Option", "option")))
    after = _text_after_first_prefix(pred, ("answer is:", "is:", "answer:", "correct option is:"))
    if after is not None:
        return float(after.startswith(letter) or after.startswith(name))
    return 0.0


@METRICS.register("infbench_dialogue")
def infbench_dialogue(prediction: str, references: Sequence[str]) -> float:
    """InfiniteBench longdialogue_qa_eng: the first reference (a character name, upper case) is one of the
    prediction's upper-cased words. Like the benchmark, only the first reference counts."""
    _require_references("infbench_dialogue", references)
    words = [w.upper() for w in _words_without(prediction.strip(), "\n:\"'.,?!{}")]
    return float(str(references[0]) in words)


@best_over_references("infbench_math_find")
def infbench_math_find(prediction: str, reference: str) -> float:
    """InfiniteBench math_find: the first number (integer or decimal) of the prediction equals the label,
    compared as an integer when the label is one, else as a float."""
    found = re.search(r"\d+\.\d+|\d+", prediction)
    if found is None:
        return 0.0
    value = found.group(0)
    try:
        return float(int(value) == int(reference))
    except ValueError:
        pass
    try:
        return float(float(value) == float(reference))
    except ValueError:
        return 0.0


@best_over_references("infbench_math_calc")
def infbench_math_calc(prediction: str, reference: str) -> float:
    """InfiniteBench math_calc: length of the correct prefix of the prediction's numbers over the number of
    intermediate values. The reference lists the values (e.g. '[1, 4, 8]'); signs are ignored on both sides,
    as in the benchmark (the values are non-negative by construction)."""
    labels = [int(n) for n in _numbers(reference)]
    if not labels:
        raise ValueError(f"infbench_math_calc reference {reference!r} has no numbers")
    predicted = [int(n) for n in _numbers(prediction)]
    correct = 0
    for label, value in zip(labels, predicted, strict=False):  # the prediction may be shorter or longer
        if label != value:
            break
        correct += 1
    return correct / len(labels)


@best_over_references("infbench_code_run")
def infbench_code_run(prediction: str, reference: str) -> float:
    """InfiniteBench code_run: the last word of the prediction (split on whitespace and newline . ` ' " :)
    is an integer equal to the label."""
    words = _words_without(prediction.strip(), "\n.`'\":")
    if not words:
        return 0.0
    try:
        return float(int(words[-1]) == int(reference))
    except ValueError:
        return 0.0
