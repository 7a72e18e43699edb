"""Regenerate the hyperparameter tables of docs/methods.md from the method dataclasses and conf/method/*.yaml.

    python scripts/method_docs.py           # rewrite the generated blocks in place
    python scripts/method_docs.py --check   # exit 1 (and name the stale blocks) when docs/methods.md is out of date

Only the text between a method's marker comments is generated; the prose around them is written by hand:

    <!-- method-docs:begin snapkv -->
    ... (generated) ...
    <!-- method-docs:end snapkv -->

A registered method without a block, or a block naming no registered method, is an error: every method needs a
hand-written section in docs/methods.md holding its block.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import yaml

import kvbench.methods

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods.md"
CONF_METHOD = ROOT / "conf" / "method"
BLOCK = re.compile(r"<!-- method-docs:begin (?P<name>\w+) -->\n(?P<body>.*?)<!-- method-docs:end (?P=name) -->", re.S)
# `key: value   # comment` at the top level of a method yaml: the comment becomes the table's note.
YAML_COMMENT = re.compile(r"^(?P<key>\w+):[^#]*#\s*(?P<comment>.*?)\s*$")


def yaml_text(value: Any) -> str:
    """A value as it would be written in a yaml file or on the command line (null, true, [1, 2], {})."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    return str(value)


def cell(text: str) -> str:
    """Markdown table cell: pipes inside the text would split the cell."""
    return text.replace("|", "\\|")


def init_fields(cls: type) -> list[dataclasses.Field]:
    """The hyperparameters of a method class: its dataclass fields set through the constructor."""
    return [f for f in dataclasses.fields(cls) if f.init]


def field_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return yaml_text(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return yaml_text(f.default_factory())
    return "required"


def field_type(f: dataclasses.Field) -> str:
    # Modules use `from __future__ import annotations`, so the annotation is already the source text.
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def method_yaml(name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """conf/method/<name>.yaml: its values and the inline comment of each top-level key."""
    path = CONF_METHOD / f"{name}.yaml"
    text = path.read_text()
    comments = {m["key"]: m["comment"] for line in text.splitlines() if (m := YAML_COMMENT.match(line))}
    return yaml.safe_load(text) or {}, comments


def source_path(cls: type) -> str:
    return cls.__module__.replace(".", "/") + ".py"


def render(name: str) -> str:
    """The generated block body of one method: source links and its hyperparameter table."""
    cls = kvbench.methods.METHODS.get(name)
    values, comments = method_yaml(name)
    source = source_path(cls)
    lines = [
        f"Source: [`{source}`](../{source}); config: [`conf/method/{name}.yaml`](../conf/method/{name}.yaml)"
        f" (`method={name}`).",
        "",
    ]
    fields = init_fields(cls)
    if not fields:
        lines.append("No hyperparameters.")
    else:
        lines += [
            f"| hyperparameter | type | dataclass default | `{name}.yaml` | note |",
            "| --- | --- | --- | --- | --- |",
        ]
        for f in fields:
            in_yaml = yaml_text(values[f.name]) if f.name in values else "(absent)"
            row = [f"`{f.name}`", f"`{field_type(f)}`", f"`{field_default(f)}`", f"`{in_yaml}`"]
            lines.append("| " + " | ".join(cell(c) for c in row + [comments.get(f.name, "")]) + " |")
    return "\n".join(lines) + "\n"


def regenerate(text: str) -> str:
    """`text` (docs/methods.md) with every generated block rewritten; raises ValueError when a registered method
    has no block or a block names an unregistered method."""
    names = set(kvbench.methods.METHODS.names())
    found = [m["name"] for m in BLOCK.finditer(text)]
    missing, unknown = sorted(names - set(found)), sorted(set(found) - names)
    if missing or unknown:
        raise ValueError(f"docs/methods.md: methods without a block: {missing}; blocks of unknown methods: {unknown}")
    return BLOCK.sub(
        lambda m: f"<!-- method-docs:begin {m['name']} -->\n{render(m['name'])}<!-- method-docs:end {m['name']} -->",
        text,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 when docs/methods.md is stale")
    args = parser.parse_args(argv)
    current = DOC.read_text()
    try:
        fresh = regenerate(current)
    except ValueError as err:
        print(f"method_docs: {err}", file=sys.stderr)
        return 1
    if fresh == current:
        return 0
    if args.check:
        stale = [m["name"] for m in BLOCK.finditer(current) if m["body"] != render(m["name"])]
        print(f"method_docs: stale blocks in docs/methods.md: {', '.join(stale)}", file=sys.stderr)
        print("run: python scripts/method_docs.py", file=sys.stderr)
        return 1
    DOC.write_text(fresh)
    print(f"method_docs: rewrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
