"""The documentation matches the code: docs/methods.md's generated hyperparameter tables, one yaml and one docs
section per registered method, kvbench's own `--help`, and every relative link and repository path in the
README and docs/ pointing at something that exists."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvbench.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
REGENERATE = "python scripts/method_docs.py"


def load_method_docs():
    spec = importlib.util.spec_from_file_location("method_docs", ROOT / "scripts" / "method_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def method_docs():
    return load_method_docs()


def init_field_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(METHODS.get(name)) if f.init]


# --- docs/methods.md: generated tables -------------------------------------------------------------------------


def test_methods_md_tables_are_regenerated(method_docs):
    current = (ROOT / "docs" / "methods.md").read_text()
    fresh = method_docs.regenerate(current)
    stale = [m["name"] for m in method_docs.BLOCK.finditer(current) if m["body"] != method_docs.render(m["name"])]
    assert fresh == current, f"docs/methods.md is out of date for {stale}: run `{REGENERATE}` and commit the result"


def test_a_changed_yaml_default_makes_the_docs_stale(method_docs, tmp_path, monkeypatch):
    # The staleness check above must bite: a yaml default that moves without regenerating shows up in the block.
    for path in (CONF / "method").glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    snapkv = tmp_path / "snapkv.yaml"
    snapkv.write_text(snapkv.read_text().replace("window: 32", "window: 48"))
    monkeypatch.setattr(method_docs, "CONF_METHOD", tmp_path)
    block = method_docs.render("snapkv")
    assert "| `window` | `int` | `32` | `48` |" in block
    current = (ROOT / "docs" / "methods.md").read_text()
    assert method_docs.regenerate(current) != current


def test_generated_rows_carry_every_field_with_its_type_and_default(method_docs):
    for name in METHODS.names():
        block = method_docs.render(name)
        cls = METHODS.get(name)
        assert f"[`kvbench/methods/{cls.__module__.rsplit('.', 1)[1]}.py`]" in block, name
        fields = [f for f in dataclasses.fields(cls) if f.init]
        rows = [re.split(r"(?<!\\)\|", line) for line in block.splitlines() if line.startswith("| `")]
        assert [row[1].strip() for row in rows] == [f"`{f.name}`" for f in fields], name
        for row, f in zip(rows, fields, strict=True):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert row[3].strip() == f"`{method_docs.yaml_text(default)}`", (name, f.name)
        if not fields:
            assert "No hyperparameters." in block


# --- one yaml and one docs section per method -------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((CONF / "method").glob("*.yaml")), ids=lambda p: p.stem)
def test_method_yaml_keys_are_the_dataclass_init_fields(path):
    values = yaml.safe_load(path.read_text()) or {}
    assert values.get("name") == path.stem, f"{path.name}: name must be '{path.stem}'"
    assert path.stem in METHODS, f"{path.name}: no registered method '{path.stem}'"
    keys = sorted(set(values) - {"name"})
    assert keys == sorted(init_field_names(path.stem)), (
        f"{path.name} keys differ from the dataclass fields of {METHODS.get(path.stem).__name__}"
    )


def test_every_registered_method_has_a_yaml_a_docs_section_and_a_readme_row():
    methods_md = (ROOT / "docs" / "methods.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in METHODS.names():
        cls = METHODS.get(name)
        source = cls.__module__.replace(".", "/") + ".py"
        assert (CONF / "method" / f"{name}.yaml").is_file(), f"conf/method/{name}.yaml missing"
        assert re.search(rf"^### {name}$", methods_md, re.M), f"docs/methods.md: no '### {name}' section"
        assert f"<!-- method-docs:begin {name} -->" in methods_md, f"docs/methods.md: no generated block for {name}"
        row = re.search(rf"^\| `{name}` \|.*$", readme, re.M)
        assert row, f"README.md methods table: no row for `{name}`"
        assert f"]({source})" in row.group(0), f"README.md row of {name} must link {source}"


# --- python -m kvbench --help -----------------------------------------------------------------------------------


def kvbench_help(*overrides: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "kvbench", *overrides, "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_is_kvbench_own():
    text = kvbench_help()
    assert "Powered by Hydra" not in text and "is powered by Hydra" not in text
    assert "Usage:\n  python -m kvbench [group=option ...] [key=value ...]" in text
    for group in ("model", "method", "task", "experiment"):
        options = ", ".join(sorted(p.stem for p in (CONF / group).glob("*.yaml")))
        assert f"\n{group}: {options}\n" in text, group
    keys_section = text.split("== Top-level keys (conf/config.yaml) ==", 1)[1].split("==", 1)[0]
    listed = set(re.findall(r"^  (\w+) ", keys_section, re.M))
    config_keys = set(yaml.safe_load((CONF / "config.yaml").read_text())) - {"defaults", "hydra"}
    assert listed == config_keys
    assert text.count("\n  python -m kvbench ") >= 3  # the examples
    assert "docs/methods.md" in text and "README.md" in text


def test_help_shows_the_config_composed_with_the_overrides():
    text = kvbench_help("method=kivi")
    composed = text.split("== Composed config (with the overrides given) ==", 1)[1]
    method = yaml.safe_load(composed.split("Documentation:", 1)[0])["method"]
    assert method["name"] == "kivi" and set(method) - {"name"} == set(init_field_names("kivi"))


# --- links and paths --------------------------------------------------------------------------------------------

# [text](target); not an image, not an escaped \[...\] (a method label such as kv_distill\[snapkv\](bias=True)).
LINK = re.compile(r"(?<![!\\])\[(?:[^\]\\\n]|\\.)*\]\(([^)\s]+)\)")
# Repository paths written as code, e.g. `kvbench/harness/fidelity.py`; results/ holds run outputs (git-ignored).
REPO_PATH = re.compile(r"`((?:kvbench|scripts|conf|tasks|tests|docs|notebooks)/[\w./-]*)`")


def prose(markdown: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped, spaces to hyphens."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_paths_exist(page):
    text = prose(page.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            broken.append(f"{target} (no such heading)")
    for path in REPO_PATH.findall(text):
        if not (ROOT / path).exists():
            broken.append(f"`{path}`")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text() + (ROOT / "docs" / "results" / "README.md").read_text()
    for page in sorted((ROOT / "docs").rglob("*.md")):
        if page.name != "README.md":
            assert f"]({page.name})" in index or f"]({page.relative_to(ROOT / 'docs')})" in index, page


def test_result_pages_state_command_date_commit_and_machine():
    for page in sorted((ROOT / "docs" / "results").glob("*.md")):
        if page.name == "README.md":
            continue
        text = page.read_text()
        assert "**Command**" in text, page.name
        assert re.search(r"\*\*Recorded\*\* \d{4}-\d{2}-\d{2}, commits? `[0-9a-f]{7}`", text), page.name
        assert "**Machine** " in text, page.name
