"""Sizing generated prompts to a token target: the largest size that still fits, found in a few tokenizations."""

from __future__ import annotations

from collections.abc import Callable


def largest_fitting(fits: Callable[[int], bool], guess: int, minimum: int = 1) -> int:
    """The largest n >= minimum with fits(n), for a `fits` that holds up to some n and fails after it.

    Starts at `guess` (e.g. a linear extrapolation), gallops to a bracket, then bisects: a good guess costs two
    or three calls. Raises ValueError if even `minimum` does not fit.
    """
    if not fits(minimum):
        raise ValueError(f"even the smallest size ({minimum}) does not fit")
    step = 1
    if fits(max(minimum, guess)):
        low = max(minimum, guess)
        while fits(low + step):
            low += step
            step *= 2
        high = low + step
    else:
        high = max(minimum, guess)
        while not fits(max(minimum, high - step)):
            high = max(minimum, high - step)
            step *= 2
        low = max(minimum, high - step)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low
