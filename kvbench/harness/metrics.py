"""Scoring functions: (prediction, references) -> score in [0, 1]. Registered by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvbench.registry import Registry

Metric = Callable[[str, Sequence[str]], float]
METRICS: Registry[Metric] = Registry("metric")


@METRICS.register("string_match_all")
def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's metric: fraction of references found (case-insensitive substring) in the prediction."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


@METRICS.register("string_match_part")
def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER's QA metric: 1 if any reference is found (case-insensitive substring) in the prediction."""
    pred = prediction.lower()
    return float(any(ref.lower() in pred for ref in references))


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    return METRICS.get(metric)(prediction, references)
