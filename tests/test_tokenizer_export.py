"""The SmolLM2 tokenizer exported to a directory (for a bare GPU image without the GGUF) is the GGUF one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvbench.engine.models import load_model, smollm2_tokenizer
from tests.conftest import model_config

ROOT = Path(__file__).resolve().parents[1]


def test_exported_tokenizer_matches_the_gguf_one_and_loads_the_tiny_model(tmp_path, tiny_lm):
    out = tmp_path / "tokenizer"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_tokenizer.py"), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert sum(f.stat().st_size for f in out.iterdir()) < 5 * 2**20  # small enough to carry in the tree
    exported, gguf = smollm2_tokenizer(str(out)), smollm2_tokenizer()
    text = "The magic number is 4821937.\nWhat is the magic number?"
    assert exported(text)["input_ids"] == gguf(text)["input_ids"]
    lm = load_model(model_config("tiny_random", tokenizer=str(out)))
    assert lm.tokenizer.decode(tiny_lm.tokenizer(text)["input_ids"]) == tiny_lm.tokenizer.decode(
        tiny_lm.tokenizer(text)["input_ids"]
    )
    assert lm.eos_token_ids == tiny_lm.eos_token_ids


def test_a_missing_tokenizer_directory_fails_in_one_line(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="export_tokenizer.py"):
        smollm2_tokenizer(str(tmp_path / "nowhere"))
