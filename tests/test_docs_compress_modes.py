"""What the docs say about compress=context (the kvpress setting) against the methods that keep evicting."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from kvbench.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def text_units(markdown: str) -> list[str]:
    """Table rows one by one, every other paragraph with its wrapped lines joined."""
    units: list[str] = []
    paragraph: list[str] = []
    for line in [*markdown.splitlines(), ""]:
        if line.strip() and not line.startswith("|"):
            paragraph.append(line.strip())
            continue
        if paragraph:
            units.append(" ".join(paragraph))
            paragraph = []
        if line.startswith("|"):
            units.append(line)
    return units


def test_docs_call_compress_context_the_kvpress_setting_only_with_the_decode_evicting_methods_named():
    # The methods that keep evicting after the prefill compression, from the code: a `decode_evict` field on by
    # default. The README's `compress` row (and any docs page repeating it) must name exactly these.
    evicting = sorted(
        name
        for name in METHODS.names()
        if any(f.name == "decode_evict" and f.default is True for f in dataclasses.fields(METHODS.get(name)))
    )
    assert evicting == ["h2o", "hierarchical", "streamingllm", "tova"]
    readme = ROOT / "README.md"
    pages = [readme, *sorted((ROOT / "docs").rglob("*.md"))]
    lines = [(p, unit) for p in pages for unit in text_units(p.read_text()) if "kvpress setting" in unit]
    assert any(p == readme and line.startswith("| `compress` |") for p, line in lines), "README compress row"
    for page, line in lines:
        claim = re.search(r"`?context`?[^|]*the kvpress setting only for methods that compress once: (.+?) keep", line)
        assert claim, f"{page.name}: {line}"
        named = sorted(re.split(r",\s*|\s+and\s+", claim.group(1).strip()))
        assert named == evicting, f"{page.name}: {line}"
        assert "decode_evict=false" in line, f"{page.name}: {line}"
