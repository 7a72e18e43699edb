"""The commands of the README (then docs/cluster.md's) extracted from the pages and run in the order written, in a
fresh directory, as a new user would after cloning; and docs/lm-eval.md's offline command on a machine without
CUDA.

How the commands are adapted to a test (everything else runs as written):
- the model: every `python -m kvbench` run that names no model gets `model=tiny_random` (the README's own
  "seconds, random weights" model; the default SmolLM2 job takes minutes on two cores), and `model=hf
  model.name_or_path=/models/<name>` points at the tiny model saved as a transformers directory of that name
  (the run name is the path's last component); run directories named after the default model follow it;
- every run gets `max_samples=1 progress=false threads=1`: keys a run may vary (they never decide whether two
  commands may share a run directory), so the commands conflict exactly as they do as written;
- `hydra/launcher=slurm` runs on hydra-submitit-launcher's local executor (no SLURM here; the same submitit
  code path, see tests/test_sweep.py) and `hydra.launcher.partition`, a SLURM key, is dropped;
- `my_prompts.jsonl`, the user's file of the "Your own prompts" section, is written first;
- commands with placeholders (`results/<run>`, `runA runB`), `make test` (this suite), `pip install` and
  `source` are not run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "cluster.md"]
# A fenced bash block, or an inline code span holding a kvbench command.
COMMAND = re.compile(r"```bash\n(?P<block>.*?)```|`(?P<inline>(?:python -m kvbench|make run)[^`\n]*)`", re.DOTALL)
PER_RUN = ["max_samples=1", "progress=false", "threads=1"]
NOT_RUN = ("make test", "pip install", "source ")
PLACEHOLDERS = re.compile(r"<[a-z]+>|\brunA\b")


def page_commands(text: str) -> list[str]:
    """The page's commands in order: fenced bash lines (comments dropped, `\\` continuations joined) and inline
    code spans that are kvbench commands with arguments."""
    commands = []
    for match in COMMAND.finditer(text):
        if match["inline"]:
            if " " in match["inline"].strip().removeprefix("python -m "):  # a bare module name is prose
                commands.append(match["inline"].strip())
            continue
        for line in match["block"].replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"\s+#.*$", "", line).split())
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def as_argv(command: str, models: Path) -> list[str] | None:
    """The argv a test runs for a page's command (module docstring), None for a command that is not run."""
    if command.startswith(NOT_RUN) or PLACEHOLDERS.search(command):
        return None
    if command.startswith("make run"):
        args = re.fullmatch(r'make run(?: ARGS="(?P<args>[^"]*)")?', command)
        assert args, f"unexpected make command: {command}"
        command = f"python -m kvbench {args['args'] or ''}".strip()
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-m"], f"unexpected command: {command}"
    if argv[2] == "kvbench.report":
        return [sys.executable, *argv[1:3], *(arg.replace("_smollm2_135m", "_tiny_random") for arg in argv[3:])]
    assert argv[2] == "kvbench", f"unexpected command: {command}"
    args = argv[3:]
    if "--help" in args:
        return [sys.executable, "-m", "kvbench", *args]
    out = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "model.name_or_path" and value.startswith("/models/"):
            arg = f"{key}={models / Path(value).name}"
        elif arg == "hydra/launcher=slurm":
            arg = "hydra/launcher=submitit_local"
        elif key == "hydra.launcher.partition":
            continue
        out.append(arg)
    if not any(arg.startswith("model=") for arg in out):
        out.append("model=tiny_random")
    return [sys.executable, "-m", "kvbench", *out, *PER_RUN]


def save_tiny_hf_model(path: Path) -> None:
    """The tiny random model as a transformers directory (weights, config, tokenizer) at `path`, with positions
    for the README's 16K-token RULER command."""
    import kvbench.api as kv

    lm = kv.load_model("tiny_random", device="cpu")
    config = lm.model.config
    previous = config.max_position_embeddings
    config.max_position_embeddings = 32768
    try:
        lm.model.save_pretrained(path)
    finally:
        config.max_position_embeddings = previous
    lm.tokenizer.save_pretrained(path)


def run_command(argv: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=environment, timeout=timeout)


def test_page_commands_are_extracted_in_order():
    text = (
        "`python -m kvbench` a `python -m kvbench x=1` b\n"
        "```bash\nmake run   # c\npython -m kvbench \\\n    y=2  # d\n```\n`ls`"
    )
    assert page_commands(text) == ["python -m kvbench x=1", "make run", "python -m kvbench y=2"]


@pytest.mark.slow
def test_readme_commands_run_in_order_on_a_fresh_directory(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    commands = [c for page in PAGES for c in page_commands(page.read_text())]
    save_tiny_hf_model(tmp_path / "models" / "Llama-3.1-8B-Instruct")
    work = tmp_path / "clone"
    work.mkdir()
    line = {"context": "The code word is amber. " * 20, "question": "What is the code word?", "answers": ["amber"]}
    (work / "my_prompts.jsonl").write_text(json.dumps(line) + "\n")
    ran = []
    for command in commands:
        argv = as_argv(command, tmp_path / "models")
        if argv is None:
            continue
        result = run_command(argv, work)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"{command}\n{result.stderr[-3000:]}"
        ran.append(command)
    # Every kind of command the pages hold ran: the default job, help, a second config, a multirun, a hub model,
    # a JSONL task, the cluster sweep and its report.
    assert any(c.startswith("make run") for c in ran) and any("--help" in c for c in ran)
    assert any("hydra/launcher=slurm" in c for c in ran) and any("kvbench.report" in c for c in ran)
    runs = sorted(p.name for p in (work / "results").iterdir() if (p / "summary.csv").exists())
    assert runs == [
        "ielts_tiny_random",
        "jsonl_tiny_random",
        "niah_essay",
        "niah_sweep_tiny_random",
        "niah_tiny_random",
        "ruler_Llama-3.1-8B-Instruct",
    ]
    assert (work / "results" / "report_niah" / "table.md").exists()
    assert not list((work / "results").glob("ruler_*/models"))  # the model path's slashes made no directories


LM_EVAL_PAGE = ROOT / "docs" / "lm-eval.md"


def lm_eval_offline_command() -> str:
    (command,) = [c for c in page_commands(LM_EVAL_PAGE.read_text()) if "--include_path tests/fixtures" in c]
    return command


def test_lm_eval_offline_command_with_the_tiny_model_runs_without_cuda(tmp_path):
    """docs/lm-eval.md's offline command with model=tiny_random (its only change), CUDA hidden: lm-eval's own
    default device (cuda:0) does not reach the adapter."""
    pytest.importorskip("lm_eval")
    command = lm_eval_offline_command().replace("model=smollm2,", "model=tiny_random,")
    result = run_command([sys.executable, *shlex.split(command)[1:]], ROOT, CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kvbench_tiny_mc" in result.stdout and "kvbench_tiny_gen" in result.stdout


def test_lm_eval_cuda_device_without_cuda_fails_in_one_line_before_loading(tmp_path):
    pytest.importorskip("lm_eval")
    command = lm_eval_offline_command().replace("model=smollm2,", "model=tiny_random,")
    result = run_command(
        [sys.executable, *shlex.split(command)[1:], "--device", "cuda:0"], ROOT, CUDA_VISIBLE_DEVICES=""
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "kvbench: error: device cuda:0 needs CUDA, which this machine (or this torch build) does not have; "
        "use device=auto (the default: CUDA when available, else CPU) or device=cpu"
    )


@pytest.mark.slow
def test_lm_eval_offline_command_as_written_runs_without_cuda():
    """docs/lm-eval.md's offline command exactly as written (the embedded SmolLM2), CUDA hidden."""
    pytest.importorskip("lm_eval")
    result = run_command([sys.executable, *shlex.split(lm_eval_offline_command())[1:]], ROOT, CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kvbench_tiny_mc" in result.stdout and "kvbench_tiny_gen" in result.stdout
