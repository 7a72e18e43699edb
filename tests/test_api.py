"""The public Python API (kvbench.api) and task=jsonl: the CLI and the API share one path, the README's
"Your own prompts" example runs, and bad JSONL fails naming file:line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from test_app import TINY, cli

import kvbench.api as kv
from kvbench.app import run
from kvbench.config import CONF_DIR
from kvbench.harness.results import ResultsStore
from kvbench.tasks.jsonl import JsonlTaskError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    {
        "context": " ".join(["The grass is green. The sky is blue."] * 12) + " The code word is falcon.",
        "question": "What is the code word?",
        "answer_prefix": "The code word is",
        "answers": ["falcon"],
    },
    {
        "id": "capital",
        "context": "Paris is the capital of France. " * 10,
        "question": "What is the capital of France?",
        "answers": "Paris",
        "metric": "string_match_part",
        "max_new_tokens": 3,
        "meta": {"topic": "geography"},
    },
]


def composed(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"results_dir={tmp_path}", *overrides])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_jsonl_task_round_trip_through_cli_path_and_api(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    result = run(composed(tmp_path, "task=jsonl", f"task.path={data}", "task.max_new_tokens=4", "budget=[16]"))
    rows = sorted(ResultsStore(result["run_dir"]).rows(), key=lambda r: (r["sample_id"], r["method"]))
    assert [(r["sample_id"], r["method"], r["budget"]) for r in rows] == [
        ("capital", "full", None),
        ("capital", "snapkv", 16),
        ("line1", "full", None),
        ("line1", "snapkv", 16),
    ]
    by_id = {r["sample_id"]: r for r in rows}
    assert by_id["capital"]["answers"] == ["Paris"] and by_id["capital"]["metric"] == "string_match_part"
    assert by_id["capital"]["meta"] == {"topic": "geography"} and by_id["capital"]["output_tokens"] <= 3
    assert by_id["line1"]["metric"] == "string_match_all" and by_id["line1"]["answers"] == ["falcon"]
    assert all(r["status"] == "ok" and r["task"] == "jsonl" for r in rows)

    # The same prompts through the Python API: identical keys (same row identity) and identical outputs.
    lm = kv.load_model({"kind": "tiny_random", "device": "cpu"})
    task = kv.load_task("jsonl", path=str(data), max_new_tokens=4)
    api_rows = kv.evaluate(lm, task.samples(lm.tokenizer, lm.max_context), "snapkv", [16], include_full=True, seed=42)
    api_rows.sort(key=lambda r: (r["sample_id"], r["method"]))
    assert [r["key"] for r in api_rows] == [r["key"] for r in rows]
    assert [r["output_ids"] for r in api_rows] == [r["output_ids"] for r in rows]
    frame = kv.to_frame(api_rows)
    assert list(frame["kept_entries"]) == [r["kept_entries"] for r in rows]
    assert "meta.topic" in frame


def test_api_builds_models_methods_and_sweeps_on_one_prefill(tmp_path, monkeypatch):
    import kvbench.harness.runner as runner

    assert kv.load_model({"kind": "tiny_random", "device": "cpu"}) is kv.load_model("tiny_random", device="cpu")
    window = kv.build_method("window")
    assert kv.build_method({"name": "snapkv", "window": 8}).window == 8
    assert kv.build_method("snapkv", kernel=3).kernel == 3
    prefills = []
    original = runner.prefill
    monkeypatch.setattr(runner, "prefill", lambda *a, **k: prefills.append(1) or original(*a, **k))
    sample = kv.Sample("s", "word " * 60, "Which word?", "", ["word"], "string_match_all", 2)
    rows = kv.evaluate({"kind": "tiny_random", "device": "cpu"}, [sample], [window, "streamingllm"], [8, 16])
    assert len(prefills) == 1
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("window", 8),
        ("window", 16),
        ("streamingllm", 8),
        ("streamingllm", 16),
    ]
    layers, kv_heads = 4, 2
    assert [r["kept_entries_compressed"] for r in rows] == [8 * layers * kv_heads, 16 * layers * kv_heads] * 2


def test_api_bad_input_is_one_line():
    with pytest.raises(ValueError, match=r"unknown model 'tiny_randm'.*Did you mean 'tiny_random'"):
        kv.load_model("tiny_randm")
    with pytest.raises(ValueError, match=r"unknown parameter 'windw' for method snapkv"):
        kv.build_method("snapkv", windw=3)


def test_jsonl_bad_rows_name_file_and_line(tmp_path):
    good = PROMPTS[0]
    cases = {
        "bad_json": (["{not json"], r":1: malformed JSONL row"),
        "missing": ([good, {"context": "c", "question": "q"}], r":2: missing field 'answers'"),
        "unknown_field": ([good, good | {"id": "x", "answer": "y"}], r":2: unknown field 'answer'. Valid fields: "),
        "metric": ([good | {"metric": "exact"}], r":1: unknown metric 'exact'. Valid metrics: .*string_match_all"),
        "answers": ([good | {"answers": []}], r":1: field 'answers' must be a string or a non-empty list"),
        "duplicate": ([good | {"id": "a"}, good | {"id": "a"}], r":2: duplicate id 'a'"),
    }
    for name, (rows, message) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        with pytest.raises(JsonlTaskError, match=re.escape(str(path)) + message):
            list(kv.load_task("jsonl", path=str(path)).samples(None, 0))
    with pytest.raises(FileNotFoundError, match="task.path '.*nope.jsonl' does not exist"):
        kv.load_task("jsonl", path=str(tmp_path / "nope.jsonl"))


def test_cli_jsonl_errors_are_one_line(tmp_path):
    missing = cli(tmp_path, "model=tiny_random", "task=jsonl", f"task.path={tmp_path / 'nope.jsonl'}")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"kvbench: error: task.path '{tmp_path / 'nope.jsonl'}' does not exist (a JSONL file, one prompt per line)"
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", [PROMPTS[0], {"context": "c", "question": 3, "answers": "a"}])
    result = cli(tmp_path, "model=tiny_random", "model.device=cpu", "task=jsonl", f"task.path={bad}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"kvbench: error: {bad}:2: field 'question' must be a string, got int"
    ]


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Your own prompts", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "my_prompts.jsonl", PROMPTS)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    frame = namespace["frame"]
    assert len(frame) == 2 * 3 and set(frame["status"]) == {"ok"}
