"""LongBench and InfiniteBench metrics against hand-computed values on tiny inputs."""

from __future__ import annotations

import pytest

from kvbench.harness.metrics import METRICS, score
from kvbench.registry import UnknownNameError
from kvbench.tasks.text_metrics import bind_metric, first_line_of, normalize_answer, normalize_zh_answer

CLASSES = ["Date", "City", "Date of birth"]


# ---------------------------------------------------------------- LongBench


def test_normalisation() -> None:
    assert normalize_answer("The  Cat, an owl & a DOG!") == "cat owl dog"
    assert normalize_zh_answer("北京， 天安门。ABC!") == "北京天安门abc"
    assert first_line_of("\n\nParis\nLondon") == "Paris"


def test_qa_f1_values() -> None:
    # "cat sat" vs "cat sat down": P = 1, R = 2/3 -> F1 = 0.8
    assert score("qa_f1", "The Cat sat!", ["a cat sat down"]) == pytest.approx(0.8)
    assert score("qa_f1", "dog", ["cat"]) == 0.0
    assert score("qa_f1", "", ["cat"]) == 0.0


def test_max_over_references() -> None:
    assert score("qa_f1", "cat sat", ["dog", "cat sat"]) == 1.0
    assert score("qa_f1", "cat sat", ["dog", "cat sat down", "cat"]) == pytest.approx(0.8)
    assert score("rouge_l", "the cat sat on the mat", ["zzz", "the cat is on the mat"]) == pytest.approx(5 / 6)


def test_first_line_rule() -> None:
    name = bind_metric("qa_f1", first_line=True)
    assert name == "qa_f1[first_line=True]"
    # Whole output: "paris london is big" vs "london" -> P = 1/4, R = 1 -> F1 = 0.4; first line only: 0.
    assert score("qa_f1", "\nParis\nLondon is big", ["London"]) == pytest.approx(0.4)
    assert score(name, "\nParis\nLondon is big", ["London"]) == 0.0
    assert score(name, "\n\nLondon\nParis", ["London"]) == 1.0


def test_qa_f1_zh() -> None:
    # jieba: 我/爱/北京/天安门 vs 北京/天安门 -> P = 1/2, R = 1 -> F1 = 2/3
    assert score("qa_f1_zh", "我爱北京天安门", ["北京天安门"]) == pytest.approx(2 / 3)
    # punctuation tokens vanish after normalisation
    assert score("qa_f1_zh", "北京，天安门。", ["北京天安门"]) == 1.0


def test_rouge_l() -> None:
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides; case-insensitive.
    assert score("rouge_l", "The cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)
    assert score("rouge_l", "", ["the cat"]) == 0.0


def test_rouge_zh() -> None:
    # 4 prediction words, 2 reference words, LCS 2 -> P = 1/2, R = 1 -> F = 2/3
    assert score("rouge_zh", "我爱北京天安门", ["北京天安门"]) == pytest.approx(2 / 3)
    assert score("rouge_zh", "北京天安门", ["北京天安门"]) == 1.0


def test_classification() -> None:
    name = bind_metric("classification", all_classes=CLASSES)
    # "Date" is inside the gold "Date of birth", so only the gold counts.
    assert score(name, "Date of birth", ["Date of birth"]) == 1.0
    # "City" and the gold match -> 1/2
    assert score(name, "City or Date of birth", ["Date of birth"]) == 0.5
    assert score(name, "Date", ["City"]) == 0.0
    assert score(name, "no class here", ["City"]) == 0.0


def test_classification_first_line() -> None:
    both = bind_metric("classification", all_classes=CLASSES)
    first = bind_metric("classification", all_classes=CLASSES, first_line=True)
    assert score(both, "City\nDate", ["City"]) == 0.5
    assert score(first, "City\nDate", ["City"]) == 1.0


def test_bind_metric_names() -> None:
    a = bind_metric("classification", all_classes=CLASSES)
    assert a == bind_metric("classification", all_classes=list(CLASSES))  # deterministic, registered once
    assert a.startswith("classification[all_classes=#")
    assert a != bind_metric("classification", all_classes=["Food", "City"])
    assert bind_metric("qa_f1") == "qa_f1"
    assert a in METRICS
    with pytest.raises(UnknownNameError):
        bind_metric("no_such_metric", first_line=True)
    with pytest.raises(TypeError):
        score("classification", "City", ["City"])  # all_classes is required


def test_retrieval() -> None:
    assert score("retrieval_en", "Paragraph 2", ["Paragraph 2"]) == 1.0
    assert score("retrieval_en", "Paragraph 2 or Paragraph 12", ["Paragraph 2"]) == 0.5
    assert score("retrieval_en", "I do not know", ["Paragraph 2"]) == 0.0
    assert score("retrieval_zh", "段落3", ["段落3"]) == 1.0
    assert score("retrieval_zh", "段落3，也可能是段落4", ["段落3"]) == 0.5
    with pytest.raises(ValueError, match="does not match"):
        score("retrieval_en", "2", ["the second"])


def test_count() -> None:
    assert score("count", "There are 3 unique paragraphs, not 4", ["3"]) == 0.5
    assert score("count", "3", ["3"]) == 1.0
    assert score("count", "three", ["3"]) == 0.0


def test_code_sim() -> None:
    # fences and comments are skipped: the first code line is compared
    assert score("code_sim", "```python\n# add them\nreturn a + b\n```", ["return a + b"]) == 1.0
    # Indel distance 2 over 24 characters -> 1 - 2/24
    assert score("code_sim", "return a - b", ["return a + b"]) == pytest.approx(1 - 2 / 24)
    assert score("code_sim", "// only a comment", ["x = 1"]) == 0.0


def test_empty_references_fail() -> None:
    for name in ("qa_f1", "rouge_l", "count", "infbench_choice", "infbench_dialogue"):
        with pytest.raises(ValueError, match="at least one reference"):
            score(name, "x", [])


# ---------------------------------------------------------------- InfiniteBench


def test_first_int() -> None:
    assert score("infbench_first_int", "The pass key is 01234.", ["01234"]) == 1.0
    assert score("infbench_first_int", "key 1234 or 01234", ["01234"]) == 0.0
    assert score("infbench_first_int", "no digits", ["01234"]) == 0.0


def test_kv_retrieval() -> None:
    value = "3f1c2a9e-0b4d-4c1e-9f00-1234abcd5678"
    assert score("infbench_kv", f'The value is "{value}".', [value]) == 1.0
    assert score("infbench_kv", f"{value[:-1]}", [value]) == 0.0


def test_qa_f1_zh_characters() -> None:
    assert score("infbench_qa_f1_zh", "热汤。", ["热汤"]) == 1.0
    # characters 一/碗/热/汤 vs 热/汤 -> P = 1/2, R = 1 -> 2/3
    assert score("infbench_qa_f1_zh", "一碗热汤", ["热汤"]) == pytest.approx(2 / 3)


def test_rouge_lsum() -> None:
    assert score("rouge_lsum", "the cat sat.\nthe dog ran.", ["the cat sat.\nthe dog ran."]) == 1.0
    assert score("rouge_lsum", "the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)


def test_choice() -> None:
    refs = ["Herding the goats", "B"]
    assert score("infbench_choice", "B", refs) == 1.0
    assert score("infbench_choice", "A. Keeping the dairy", refs) == 0.0
    assert score("infbench_choice", "Herding the goats", refs) == 1.0
    assert score("infbench_choice", "I think the answer is: B", refs) == 1.0
    assert score("infbench_choice", "I think the answer is C", refs) == 0.0
    assert score("infbench_choice", "Probably B", refs) == 1.0
    assert score("infbench_choice", "  ", refs) == 0.0


def test_code_debug() -> None:
    refs = ["mean", "B"]
    assert score("infbench_code_debug", "B. mean", refs) == 1.0
    assert score("infbench_code_debug", "The correct option is: B", refs) == 1.0
    assert score("infbench_code_debug", "The answer is: mean", refs) == 1.0
    assert score("infbench_code_debug", "The answer is: C", refs) == 0.0
    assert score("infbench_code_debug", "The bug is in mean", refs) == 0.0
    with pytest.raises(ValueError, match="function name, option letter"):
        score("infbench_code_debug", "B", ["B"])


def test_dialogue() -> None:
    assert score("infbench_dialogue", "Margo.", ["MARGO"]) == 1.0
    assert score("infbench_dialogue", "It was Dev", ["MARGO"]) == 0.0
    # only the first reference counts, as in the benchmark
    assert score("infbench_dialogue", "Rothstein", ["ACE", "ROTHSTEIN"]) == 0.0


def test_math_find() -> None:
    assert score("infbench_math_find", "41", ["41"]) == 1.0
    assert score("infbench_math_find", "It is 41 or 7", ["7"]) == 0.0
    assert score("infbench_math_find", "5.5", ["5.5"]) == 1.0
    assert score("infbench_math_find", "5", ["5.5"]) == 0.0
    assert score("infbench_math_find", "none", ["5"]) == 0.0


def test_math_calc() -> None:
    assert score("infbench_math_calc", "[8, 6, 15]", ["[8, 6, 16]"]) == pytest.approx(2 / 3)
    assert score("infbench_math_calc", "8 6 16 20", ["[8, 6, 16]"]) == 1.0
    assert score("infbench_math_calc", "[6, 8, 16]", ["[8, 6, 16]"]) == 0.0
    assert score("infbench_math_calc", "", ["[8, 6, 16]"]) == 0.0


def test_code_run() -> None:
    assert score("infbench_code_run", "The value is 5", ["5"]) == 1.0
    assert score("infbench_code_run", "5 is the value", ["5"]) == 0.0
    assert score("infbench_code_run", "-2.", ["-2"]) == 1.0
    assert score("infbench_code_run", "", ["5"]) == 0.0
