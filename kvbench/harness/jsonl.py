"""Reading JSONL, the format of results rows and of local benchmark data. A bad line fails naming the file
(or source) and the line number."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class MalformedRowError(ValueError):
    pass


def iter_jsonl(
    lines: Iterable[str | bytes], source: str, allow_truncated_tail: bool = False
) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line. With `allow_truncated_tail`, an unterminated last line
    that does not parse (a write cut by a kill) is skipped with a warning instead of failing."""
    pending: tuple[int, str | bytes] | None = None
    for number, line in enumerate(lines, start=1):
        if pending is not None:
            yield _parse(*pending, source)
            pending = None
        if not line.strip():
            continue
        terminated = line.endswith(b"\n" if isinstance(line, bytes) else "\n")
        if allow_truncated_tail and not terminated:
            pending = (number, line)  # the last line: parse it only once we know nothing follows
            continue
        yield _parse(number, line, source)
    if pending is not None:
        try:
            yield _parse(*pending, source)
        except MalformedRowError:
            log.warning("%s:%d: ignoring an unterminated last row (interrupted write)", source, pending[0])


def decode_utf8(data: bytes, source: str, first_line: int = 1) -> str:
    """`data` as text; bytes that are not UTF-8 fail naming the file, line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise MalformedRowError(
            f"{source}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
            "re-encode the file as UTF-8"
        ) from None


def _parse(number: int, line: str | bytes, source: str) -> tuple[int, dict]:
    if isinstance(line, bytes):
        line = decode_utf8(line, source, number)
    try:
        row = json.loads(line)
    except ValueError as err:
        raise MalformedRowError(f"{source}:{number}: malformed JSONL row ({err})") from None
    if not isinstance(row, dict):
        raise MalformedRowError(
            f"{source}:{number}: malformed JSONL row (expected an object, got {type(row).__name__})"
        )
    return number, row


def read_jsonl(path: str | Path, allow_truncated_tail: bool = False) -> list[dict]:
    path = Path(path)
    with path.open("rb") as handle:
        return [row for _, row in iter_jsonl(handle, str(path), allow_truncated_tail)]
