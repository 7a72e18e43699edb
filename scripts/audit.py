"""Hostile-input audit: bad and awkward input through the CLI and the Python API, each case classified by what
the user sees.

    python scripts/audit.py [--only SUBSTRING] [--markdown PATH]

Each case is a command line (`python -m kvbench ...`, `python -m kvbench.calibrate`, `python -m kvbench.report`,
`python -m kvbench.lm_eval`) or a short Python API snippet, run in a subprocess on the tiny random model in a
temporary directory, with the outcome it should have:

- `refusal`: one `...: error: <message>` line (or, through the API, an exception of a user-error type whose
  message is one line), a non-zero exit, no traceback and nothing written where the case says so;
- `ok`: exit 0 and the case's own check of what was written or said (a notice, a summary's counts).

What happened is one of four classes: `one-line refusal`, `traceback` (a traceback or an exception of an
internal type), `silent acceptance` (exit 0 where a refusal, a notice or a result was expected and is not
there), `ok`. A case passes when its class is the expected one and its check holds. Cases that need root (a
tmpfs mount) or a CUDA-less machine are skipped, with the reason, where those do not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_random", "model.device=cpu", "progress=false", "threads=1"]
SMALL = ["task.lengths=[256]", "task.depths=[50]", "task.max_new_tokens=4", "budget=[16]"]
CONVERSATION = ["task=conversation", "task.dialogues=1", "task.turns=4", "task.facts=1", "task.questions=1"]
USER_ERRORS = ("ValueError", "FileNotFoundError", "PermissionError", "OSError", "FileExistsError", "IsADirectoryError")
CLASSES = ("one-line refusal", "traceback", "silent acceptance", "ok")


@dataclass
class Outcome:
    """What one command did: exit status and output, and whether the case's own check held."""

    rc: int
    out: str
    err: str
    check: bool = True
    note: str = ""


@dataclass
class Case:
    """One audit case: its issue item, a name, what it runs (given a fresh directory) and the expected class."""

    item: str
    name: str
    run: Callable[[Path], Outcome | str]  # a str: skipped, with the reason
    expect: str  # "refusal" or "ok"
    command: str = ""


@dataclass
class Result:
    case: Case
    got: str
    passed: bool
    seconds: float
    detail: str = field(default="")


def env(work: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "KVBENCH_CACHE": str(work / "cache"),
        "PYTHONWARNINGS": "ignore",
    }


def run_module(work: Path, module: str, *args: str, cwd: Path | None = None, timeout: int = 600) -> Outcome:
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=cwd or work,
        env=env(work),
        timeout=timeout,
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def kvbench(work: Path, *args: str, **kwargs) -> Outcome:
    return run_module(work, "kvbench", *args, **kwargs)


def api(work: Path, code: str, timeout: int = 600) -> Outcome:
    """A Python snippet; an exception is reported as `API <type>: <message>` on stderr (exit 3), so the class
    comes from the exception's type and message rather than from the interpreter's traceback."""
    wrapped = (
        "import sys, traceback\ntry:\n"
        + textwrap.indent(textwrap.dedent(code), "    ")
        + (
            "\nexcept Exception as err:\n"
            "    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)\n"
            "    kind = 'user' if any(c.__name__ in USER for c in type(err).__mro__) else 'internal'\n"
            "    lines = message.strip().count(chr(10)) + 1\n"
            "    print(f'API {kind} {lines} {type(err).__name__}: {message}', file=sys.stderr)\n"
            "    sys.exit(3)\n"
        )
    )
    wrapped = f"USER = {USER_ERRORS!r}\n" + wrapped
    done = subprocess.run(
        [sys.executable, "-c", wrapped], capture_output=True, text=True, cwd=work, env=env(work), timeout=timeout
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


def classify(outcome: Outcome) -> str:
    """The class of what the user saw (module docstring)."""
    text = outcome.out + outcome.err
    if "Traceback (most recent call last)" in text:
        return "traceback"
    if outcome.rc == 0:
        return "ok" if outcome.check else "silent acceptance"
    api_lines = [line for line in outcome.err.splitlines() if line.startswith("API ")]
    if api_lines:
        _, kind, lines, _ = api_lines[0].split(" ", 3)
        return "one-line refusal" if kind == "user" and lines == "1" else "traceback"
    errors = [line for line in outcome.err.splitlines() if ": error:" in line]
    if len(errors) == 1 and not any(line.startswith(("  File ", "Error executing job")) for line in text.splitlines()):
        return "one-line refusal"
    return "traceback"


def message(outcome: Outcome) -> str:
    for line in outcome.err.splitlines():
        if ": error:" in line or line.startswith("API "):
            return line
    return (outcome.err.strip().splitlines() or [""])[-1]


def nothing_written(results: Path) -> bool:
    """No run directory with a config, manifest or rows under `results`."""
    if not results.is_dir():
        return True
    names = {"config.yaml", "manifest.json", "samples.jsonl"}
    return not any(path.name in names for path in results.rglob("*"))


# -- case builders ------------------------------------------------------------------------------------------


def refuse(item: str, name: str, args: list[str], contains: str = "", base: list[str] | None = None) -> Case:
    """`python -m kvbench <TINY> <SMALL> args` must stop in one line (naming `contains`) before writing a run."""
    full = [*(TINY + SMALL if base is None else base), *args]
    flags = [a for a in full if a.startswith("-")]
    overrides = [a for a in full if not a.startswith("-")]

    def go(work: Path) -> Outcome:
        results = work / "results"
        given = any(a.startswith("results_dir=") for a in overrides)
        outcome = kvbench(work, *flags, *overrides, *([] if given else [f"results_dir={results}"]))
        outcome.check = contains in message(outcome) and nothing_written(results)
        if not nothing_written(results):
            outcome.note = "wrote a run directory"
        return outcome

    return Case(item, name, go, "refusal", "python -m kvbench " + " ".join([*flags, *args]))


def refuse_api(item: str, name: str, code: str, contains: str = "") -> Case:
    def go(work: Path) -> Outcome:
        outcome = api(work, code)
        outcome.check = contains in message(outcome)
        return outcome

    return Case(item, name, go, "refusal", "API: " + " ".join(code.split())[:90])


def run_ok(item: str, name: str, args: list[str], check: Callable[[Path, Outcome], bool], base=None) -> Case:
    """`python -m kvbench <TINY> <SMALL> args` must run (exit 0) and `check(results_dir, outcome)` hold."""
    full = [*(TINY + SMALL if base is None else base), *args]

    def go(work: Path) -> Outcome:
        results = work / "results"
        outcome = kvbench(work, *full, f"results_dir={results}")
        if outcome.rc == 0:
            outcome.check = check(results, outcome)
        return outcome

    return Case(item, name, go, "ok", "python -m kvbench " + " ".join(args))


def summary_rows(results: Path) -> list[dict[str, str]]:
    import csv

    [path] = list(results.glob("*/summary.csv"))
    with path.open() as handle:
        return list(csv.DictReader(handle))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode == 0


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def no_cuda() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True
    )
    return probe.stdout.strip() == b"False"


# -- the cases ----------------------------------------------------------------------------------------------


def lm_eval_cases() -> list[Case]:
    tasks = ["--tasks", "kvbench_tiny_gen", "--include_path", str(ROOT / "tests/fixtures/lm_eval"), "--limit", "1"]

    def readme(work: Path) -> Outcome:  # docs/lm-eval.md's offline command, tiny model, no device given
        model_args = "model=tiny_random,method=snapkv,budget=16"
        outcome = run_module(work, "kvbench.lm_eval", "--model", "kvbench", "--model_args", model_args, *tasks,
                             cwd=ROOT)  # fmt: skip
        outcome.check = "kvbench_tiny_gen" in outcome.out
        return outcome

    def cuda(work: Path) -> Outcome | str:
        if not no_cuda():
            return "CUDA present"
        model_args = "model=tiny_random,method=snapkv,budget=16,device=cuda:0"
        outcome = run_module(work, "kvbench.lm_eval", "--model", "kvbench", "--model_args", model_args, *tasks,
                             cwd=ROOT)  # fmt: skip
        outcome.check = "cuda" in message(outcome).lower()
        return outcome

    return [
        Case("2", "lm-eval offline command, no device, CPU-only", readme, "ok", "python -m kvbench.lm_eval ..."),
        Case("2", "lm-eval device=cuda:0 without CUDA", cuda, "refusal", "python -m kvbench.lm_eval ...device=cuda:0"),
    ]


def report_cases() -> list[Case]:
    def synthetic(work: Path) -> Outcome:
        results = work / "results"
        first = kvbench(work, *TINY, "task=synthetic_length", "task.lengths=[128]", "task.samples_per_length=1",
                        "budget=[16]", f"results_dir={results}")  # fmt: skip
        if first.rc != 0:
            return first
        [run_dir] = [p for p in results.iterdir() if p.is_dir()]
        outcome = run_module(work, "kvbench.report", str(run_dir), "--out", str(work / "report"))
        outcome.check = "KV MiB" in outcome.out
        return outcome

    def lm_eval_rows(work: Path) -> Outcome:
        rows_path = work / "lm_rows"
        model_args = f"model=tiny_random,method=snapkv,budget=16,rows_path={rows_path}"
        first = run_module(work, "kvbench.lm_eval", "--model", "kvbench", "--model_args", model_args, "--tasks",
                           "kvbench_tiny_gen", "--include_path", str(ROOT / "tests/fixtures/lm_eval"), "--limit", "1",
                           cwd=ROOT)  # fmt: skip
        if first.rc != 0:
            return first
        outcome = run_module(work, "kvbench.report", str(rows_path), "--out", str(work / "report"))
        outcome.check = "KV MiB" in outcome.out
        return outcome

    def out_is_file(work: Path) -> Outcome:
        (work / "afile").write_text("x")
        outcome = tiny_run(work)
        if outcome.rc != 0:
            return outcome
        outcome = run_module(work, "kvbench.report", str(work / "results/niah_tiny_random"), "--out",
                             str(work / "afile"))  # fmt: skip
        outcome.check = "is a file" in message(outcome)
        return outcome

    def out_not_created(work: Path) -> Outcome:
        outcome = run_module(work, "kvbench.report", str(work / "missing_run"), "--out", str(work / "new_out"))
        outcome.check = not (work / "new_out").exists()
        return outcome

    def all_errors(work: Path) -> Outcome:
        outcome = tiny_run(work)
        if outcome.rc != 0:
            return outcome
        samples = work / "results/niah_tiny_random/samples.jsonl"
        broken = [{**row, "status": "error", "error": "ValueError: audit"} if row["method"] != "full" else row
                  for row in rows(samples)]  # fmt: skip
        samples.write_text("".join(json.dumps(row) + "\n" for row in broken))
        outcome = run_module(work, "kvbench.report", str(samples.parent), "--out", str(work / "report"))
        header = next((line for line in outcome.out.splitlines() if line.startswith("| method")), "")
        outcome.check = header.rstrip(" |").endswith("errors") and "| snapkv | 16 |" in outcome.out
        return outcome

    return [
        Case("3", "report of a task=synthetic_length run", synthetic, "ok", "python -m kvbench.report <run>"),
        Case("3", "report of an lm-eval rows_path directory", lm_eval_rows, "ok", "python -m kvbench.report <rows>"),
        Case("9i", "report --out is a file", out_is_file, "refusal", "python -m kvbench.report <run> --out <file>"),
        Case("9i", "report of a missing run leaves no --out", out_not_created, "refusal", "python -m kvbench.report"),
        Case("9i", "report of a run whose method rows all failed", all_errors, "ok", "python -m kvbench.report"),
    ]


def tiny_run(work: Path, *args: str) -> Outcome:
    return kvbench(work, *TINY, *SMALL, f"results_dir={work / 'results'}", *args)


def readme_cases() -> list[Case]:
    def usage_line_2(work: Path) -> Outcome:
        first = kvbench(work, *TINY, *SMALL, f"results_dir={work / 'results'}")
        if first.rc != 0:
            return first
        return kvbench(work, *TINY, "task.lengths=[256]", "task.depths=[50]", "task.max_new_tokens=4",
                       "budgets=[32,64]", "compress=context", "task.haystack=essay", "run_name=niah_essay",
                       f"results_dir={work / 'results'}")  # fmt: skip

    def cluster(work: Path) -> Outcome:
        first = kvbench(work, *TINY, *SMALL, f"results_dir={work / 'results'}")
        if first.rc != 0:
            return first
        outcome = kvbench(work, "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                          "experiment=niah_sweep", "method=snapkv,window", "budgets=[16,32]", *TINY,
                          "task.lengths=[256]", "task.depths=[50]", "task.haystack=noise", "task.max_new_tokens=4",
                          f"results_dir={work / 'results'}")  # fmt: skip
        outcome.check = (work / "results/niah_sweep_tiny_random/samples.jsonl").exists()
        return outcome

    def multirun_summary(work: Path) -> Outcome:
        outcome = kvbench(work, "-m", "method=snapkv,streamingllm", *TINY, "task.lengths=[256]",
                          "task.depths=[25,75]", "task.max_new_tokens=4", "budget=[16]",
                          f"results_dir={work / 'results'}")  # fmt: skip
        if outcome.rc == 0:
            got = {(r["method"], r["budget"]): int(r["n"]) for r in summary_rows(work / "results")}
            outcome.check = got == {("full", "full"): 2, ("snapkv", "16"): 2, ("streamingllm", "16"): 2}
            outcome.note = f"summary n: {got}"
        return outcome

    def hf_run_name(work: Path) -> Outcome:
        outcome = kvbench(work, "model=hf", "model.name_or_path=/models/Llama-3.1-8B-Instruct", "--cfg", "job",
                          "--resolve")  # fmt: skip
        outcome.check = "run_name: niah_Llama-3.1-8B-Instruct" in outcome.out
        return outcome

    return [
        Case("4", "README usage line 2 after the default run", usage_line_2, "ok", "python -m kvbench budgets=..."),
        Case("4", "README cluster sweep (submitit_local) after the default run", cluster, "ok", "-m submitit_local"),
        Case("5", "multirun summary covers every job's rows", multirun_summary, "ok", "-m method=snapkv,streamingllm"),
        Case("6", "model=hf run name from the path's last component", hf_run_name, "ok", "model=hf ... --cfg job"),
        run_ok("7", "kivi defaults on the tiny model", ["method=kivi"], lambda r, o: no_error_rows(r)),
        run_ok(
            "7",
            "kivi over snapkv on the tiny model",
            ["method=kivi", "method.base=snapkv"],
            lambda r, o: no_error_rows(r),
        ),  # fmt: skip
    ]


def no_error_rows(results: Path) -> bool:
    return all(int(row.get("errors") or 0) == 0 for row in summary_rows(results))


def disk_cases() -> list[Case]:
    def disk_full(work: Path) -> Outcome | str:
        mount = work / "small"
        if not can_mount() or not tmpfs(mount, "size=64k"):
            return "needs root to mount a tmpfs"
        try:
            outcome = kvbench(work, *TINY, "task.lengths=[256]", "task.depths=[0,10,20,30,40,50,60,70,80,90,100]",
                              "task.max_new_tokens=4", "budget=[16,32]", f"results_dir={mount}")  # fmt: skip
            samples = mount / "niah_tiny_random/samples.jsonl"
            data = samples.read_bytes() if samples.exists() else b""
            whole = data == b"" or data.endswith(b"\n")
            outcome.check = "No space left" in message(outcome) and whole
            outcome.note = f"{data.count(bytes([10]))} whole rows kept" if whole else "a partial row"
            return outcome
        finally:
            umount(mount)

    def read_only(work: Path, resume: bool) -> Outcome | str:
        mount = work / "ro"
        if not can_mount() or not tmpfs(mount, "size=8m"):
            return "needs root to mount a tmpfs"
        try:
            if resume:
                first = kvbench(work, *TINY, *SMALL, f"results_dir={mount}")
                if first.rc != 0:
                    return first
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
            outcome = kvbench(work, *TINY, *SMALL, f"results_dir={mount}")
            outcome.check = "cannot write" in message(outcome)
            return outcome
        finally:
            umount(mount)

    def read_only_multirun(work: Path) -> Outcome | str:
        mount = work / "ro"
        if not can_mount() or not tmpfs(mount, "ro,size=1m"):
            return "needs root to mount a tmpfs"
        try:
            outcome = kvbench(work, "-m", *TINY, *SMALL[:3], "budget=16,32", f"results_dir={mount}")
            outcome.check = "cannot write" in message(outcome)
            return outcome
        finally:
            umount(mount)

    return [
        Case("9a", "disk full mid-run (64 KB tmpfs)", disk_full, "refusal", "python -m kvbench results_dir=<tmpfs>"),
        Case("9c", "read-only file system, new run", lambda w: read_only(w, False), "refusal", "results_dir=<ro>"),
        Case("9c", "read-only file system, resume", lambda w: read_only(w, True), "refusal", "results_dir=<ro>"),
        Case(
            "9c", "read-only file system, multirun", read_only_multirun, "refusal", "-m budget=16,32 results_dir=<ro>"
        ),
    ]


def results_dir_cases() -> list[Case]:
    def file_dir(target: str, *sweep: str) -> Callable[[Path], Outcome]:
        def go(work: Path) -> Outcome:
            (work / "afile").write_text("x")
            path = target.format(work=work)
            flags = ["-m"] if sweep else []
            small = SMALL[:3] if sweep else SMALL
            outcome = kvbench(work, *flags, *TINY, *small, *sweep, f"results_dir={path}")
            outcome.check = "is not a directory" in message(outcome)
            return outcome

        return go

    cases = []
    for label, target in (("a file", "{work}/afile"), ("/dev/null", "/dev/null")):
        cases.append(Case("9c", f"results_dir is {label}", file_dir(target), "refusal", f"results_dir={label}"))
        for sweep in ("budget=16,32", "budget=range(1,300)", "method=glob(snap*)"):
            cases.append(
                Case(
                    "9c",
                    f"results_dir is {label}, -m {sweep}",
                    file_dir(target, sweep),
                    "refusal",
                    f"-m {sweep} results_dir={label}",
                )  # fmt: skip
            )
    return cases


def lock_cases() -> list[Case]:
    def then_corrected(bad: list[str], good: list[str], contains: str) -> Callable[[Path], Outcome]:
        def go(work: Path) -> Outcome:
            results = work / "results"
            outcome = kvbench(work, *TINY, *bad, "run_name=mine", f"results_dir={results}")
            left = nothing_written(results)
            again = kvbench(work, *TINY, *good, "run_name=mine", f"results_dir={results}")
            outcome.check = contains in message(outcome) and left and again.rc == 0
            outcome.note = "" if again.rc == 0 else f"corrected command: {message(again)}"
            return outcome

        return go

    niah_bad = ["task.lengths=[10]", "task.depths=[50]", "task.max_new_tokens=4", "budget=[16]"]
    overflow = [*CONVERSATION, "task.turns=40", "task.questions=2", "task.user_tokens=200", "budget=64"]
    return [
        Case(
            "9b",
            "niah length 10, then the corrected command",
            then_corrected(niah_bad, SMALL, "too short"),
            "refusal",
            "task.lengths=[10] run_name=mine; then lengths=[256]",
        ),  # fmt: skip
        Case(
            "9b",
            "conversation overflow, then the corrected command",
            then_corrected(overflow, [*CONVERSATION, "budget=64"], "overflows"),
            "refusal",
            "task=conversation task.turns=40 ... run_name=mine; then turns=4",
        ),  # fmt: skip
    ]


def input_cases() -> list[Case]:
    return [
        # 9c: Hydra used to trace back before kvbench checked anything.
        refuse("9c", "300-character run_name", ["run_name=" + "a" * 300], "run_name is 300 bytes"),
        refuse("9c", "model.device=cuda:7", ["model.device=cuda:7"], "model.device=cuda:7"),
        refuse("9c", "model.head_dim=abc", ["model.head_dim=abc"], "model.head_dim must be an int"),
        refuse("9c", "threads=100000", ["threads=100000"], "threads must be <="),
        refuse("9c", "unicode in an override", ["task.haystack=é"], "quote a value"),
        # 9d: fail_fast is for sample errors.
        refuse(
            "9d",
            "fail_fast with niah length 10",
            ["fail_fast=true", "task.lengths=[10]", *SMALL[1:]],
            "too short",
            base=TINY,
        ),  # fmt: skip
        Case("9d", "fail_fast with a malformed JSONL", malformed_jsonl, "refusal", "task=jsonl fail_fast=true"),
        # 9e: settings every row would refuse, refused before any model work.
        refuse(
            "9e", "conversation budget=0.5", [*CONVERSATION, "budget=0.5"], "takes int budgets", base=TINY
        ),  # fmt: skip
        refuse("9e", "kvzip in a conversation", [*CONVERSATION, "method=kvzip", "budget=64"], "kvzip", base=TINY),
        refuse(
            "9e",
            "streamingllm with compress_older_than",
            [*CONVERSATION, "method=streamingllm", "budget=64", "task.compress_older_than=2"],
            "decode_evict=false",
            base=TINY,
        ),  # fmt: skip
        refuse(
            "9e",
            "segments with compress=context",
            ["task=segments", "task.num_samples=1", "compress=context", "budget=32"],
            "compress='context' is not supported",
            base=TINY,
        ),  # fmt: skip
        refuse("9e", "snapkv kernel=4 (even)", ["method.kernel=4"], "kernel"),
        refuse("9e", "prefixkv without calibration", ["method=prefixkv"], "no calibration"),
        refuse("9e", "model.num_layers=0", ["model.num_layers=0"], "model.num_layers must be >= 1"),
        refuse("9e", "model.num_kv_heads=3", ["model.num_kv_heads=3"], "does not divide"),
        # 9f: accepted silently before.
        refuse("9f", "budget=[]", ["budget=[]"], "at least one budget", base=TINY + SMALL[:3]),
        refuse_api(
            "9f",
            "API evaluate(budgets=[])",
            "from kvbench import api\nfrom kvbench.harness.sample import "
            "Sample\ns = Sample('s', 'The sky is blue. ' * 20, 'Colour?', '', ['blue'], 'string_match_all', 2)"
            "\napi.evaluate('tiny_random', [s], 'snapkv', budgets=[])",
            "at least one budget",
        ),  # fmt: skip
        refuse("9f", "+model.anything=1", ["+model.anything=1"], "unknown key 'model.anything'"),
        refuse("9f", "model.seed=-1", ["model.seed=-1"], "model.seed must be >= 0"),
        refuse("9f", "results_dir= (empty)", ["results_dir="], "results_dir is empty"),
        refuse(
            "9f",
            "prefill_chunk with task=conversation",
            [*CONVERSATION, "budget=64", "prefill_chunk=64"],
            "prefill_chunk=64 applies to single-prompt tasks",
            base=TINY,
        ),  # fmt: skip
        run_ok(
            "9f",
            "streamingllm n_sink above the budget is said",
            ["method=streamingllm", "method.n_sink=40"],
            lambda r, o: "n_sink=40 exceeds the budget" in o.out + o.err,
        ),  # fmt: skip
        run_ok(
            "9f",
            "snapkv window above the budget is said",
            [],
            lambda r, o: "window=32 exceeds the budget" in o.out + o.err,
        ),  # fmt: skip
        Case("9f", "jsonl context middle-truncated is said with the count", truncated_jsonl, "ok", "task=jsonl"),
        Case("9f", "jsonl empty context and question", empty_jsonl, "refusal", "task=jsonl"),
        Case("9f", "resume from a row cut down to {key, status}", cut_down_row, "refusal", "resume"),
        refuse_api(
            "9f",
            "API Sample(max_new_tokens=-1)",
            "from kvbench.harness.sample import Sample\nSample('s', 'c', 'q', '', ['a'], 'string_match_all', -1)",
            "max_new_tokens must be an int >= 0",
        ),  # fmt: skip
        # 9g: the message blames the value that was set.
        refuse("9g", "kivi group_size=7", ["method=kivi", "method.group_size=7"], "group_size 7"),
        refuse("9g", "gear streaming_gap=65", ["method=gear", "method.streaming_gap=65"], "streaming_gap 65"),
        refuse("9g", "model.max_context=-1", ["model.max_context=-1"], "model.max_context must be >= 1"),
        refuse(
            "9g", "a directory as task.path", ["task=jsonl", "task.path=/", "budget=[16]"], "is a directory", base=TINY
        ),
    ]


def write_jsonl(path: Path, rows_: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows_))
    return path


def malformed_jsonl(work: Path) -> Outcome:
    path = work / "bad.jsonl"
    path.write_text('{"context": "x", "question": "q", "answers": "a"}\n{not json\n')
    outcome = kvbench(work, *TINY, "fail_fast=true", "task=jsonl", f"task.path={path}", "budget=[16]",
                      f"results_dir={work / 'results'}")  # fmt: skip
    outcome.check = "bad.jsonl:2" in message(outcome) and nothing_written(work / "results")
    return outcome


def truncated_jsonl(work: Path) -> Outcome:
    path = write_jsonl(work / "long.jsonl", [{"context": "The sky is blue. " * 200, "question": "Colour?",
                                             "answers": "blue", "max_new_tokens": 2}])  # fmt: skip
    outcome = kvbench(work, *TINY, "model.max_context=256", "task=jsonl", f"task.path={path}", "budget=[16]",
                      f"results_dir={work / 'results'}")  # fmt: skip
    # Notices go through Hydra's console log handler, which writes to stdout.
    said = [line for line in (outcome.out + outcome.err).splitlines() if "cut from its middle" in line]
    outcome.check = outcome.rc == 0 and len(said) == 1
    return outcome


def empty_jsonl(work: Path) -> Outcome:
    path = write_jsonl(work / "empty.jsonl", [{"context": " ", "question": "", "answers": "x"}])
    outcome = kvbench(work, *TINY, "task=jsonl", f"task.path={path}", "budget=[16]", f"results_dir={work / 'results'}")
    outcome.check = "both empty" in message(outcome) and nothing_written(work / "results")
    return outcome


def cut_down_row(work: Path) -> Outcome:
    first = tiny_run(work)
    if first.rc != 0:
        return first
    samples = work / "results/niah_tiny_random/samples.jsonl"
    kept = rows(samples)
    write_jsonl(samples, [kept[0], {"key": kept[1]["key"], "status": "ok"}])
    outcome = tiny_run(work)
    outcome.check = "lacks sample_fingerprint" in message(outcome)
    return outcome


def calibrate_cases() -> list[Case]:
    def calibrate(args: list[str], contains: str) -> Callable[[Path], Outcome]:
        def go(work: Path) -> Outcome:
            (work / "latin1.txt").write_bytes("first line\nd\xe9j\xe0 vu\n".encode("latin-1"))
            argv = ["prefixkv", "--model", "tiny_random", *[a.format(work=work) for a in args]]
            outcome = run_module(work, "kvbench.calibrate", *argv)
            outcome.check = contains in message(outcome) and not (work / "cache").exists()
            return outcome

        return go

    specs = [
        ("--tokens 0", ["--tokens", "0"], "--tokens must be >= 2"),
        ("--samples -1", ["--samples", "-1"], "--samples must be >= 1"),
        ("missing --text", ["--text", "{work}/missing.txt"], "No such file"),
        ("non-UTF-8 --text", ["--text", "{work}/latin1.txt"], "not UTF-8"),
        ("--device cuda:7", ["--device", "cuda:7"], "--device=cuda:7"),
        ("too many --tokens", ["--tokens", "5000"], "exceeds the context"),
    ]
    return [
        Case("9h", f"calibrate {name}", calibrate(args, contains), "refusal", "python -m kvbench.calibrate " + name)
        for name, args, contains in specs
    ]


def store_cases() -> list[Case]:
    def list_key(work: Path) -> Outcome:
        first = tiny_run(work)
        if first.rc != 0:
            return first
        samples = work / "results/niah_tiny_random/samples.jsonl"
        kept = rows(samples)
        write_jsonl(samples, [kept[0], {**kept[1], "key": [1]}])
        outcome = tiny_run(work)
        outcome.check = "must be a string" in message(outcome)
        return outcome

    def two_together(work: Path) -> Outcome:
        args = [*TINY, "task.lengths=[256]", "task.depths=[0,25,50,75,100]", "task.max_new_tokens=4", "budget=[16]",
                f"results_dir={work / 'results'}"]  # fmt: skip
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "kvbench", *args],
                cwd=work,
                env=env(work),
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            for _ in range(2)
        ]
        outs = [proc.communicate(timeout=600) for proc in procs]
        samples = rows(work / "results/niah_tiny_random/samples.jsonl")
        keys = [row["key"] for row in samples]
        # Each process prints a summary of every row (n=5 per line) or says another process still computes some.
        noted = [("claimed by another process" in out + err) for out, err in outs]
        counts = [[line.split()[4] for line in out.splitlines() if line.startswith("niah ")] for out, _ in outs]
        complete = all(note or (n and set(n) == {"5"}) for note, n in zip(noted, counts, strict=True))
        outcome = Outcome(max(p.returncode for p in procs), outs[0][0], outs[0][1] + outs[1][1])
        outcome.check = len(keys) == len(set(keys)) == 10 and complete
        outcome.note = f"{len(keys)} rows, {len(set(keys))} keys; printed n {counts}, notes {noted}"
        return outcome

    def stale_claims(work: Path) -> Outcome:
        claims = work / "results/niah_tiny_random/.claims"
        claims.mkdir(parents=True)
        for index in range(5):
            (claims / f"stale{index}").write_text("")
        outcome = tiny_run(work)
        left = list(claims.iterdir()) if claims.exists() else []
        outcome.check = not left
        outcome.note = f"{len(left)} claim files left"
        return outcome

    def kill9(work: Path) -> Outcome:
        args = [*TINY, "task.lengths=[256]", "task.depths=[0,20,40,60,80,100]", "task.max_new_tokens=4",
                "budget=[16,32]", f"results_dir={work / 'results'}"]  # fmt: skip
        samples = work / "results/niah_tiny_random/samples.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "kvbench", *args], cwd=work, env=env(work),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 300
        while time.time() < deadline and (not samples.exists() or len(rows(samples)) < 4):
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcome = kvbench(work, *args)
        keys = [row["key"] for row in rows(samples)]
        outcome.check = len(keys) == len(set(keys)) == 18  # 6 samples x (full, 16, 32)
        outcome.note = f"{len(keys)} rows, {len(set(keys))} keys"
        return outcome

    def deterministic(work: Path) -> Outcome:
        first = kvbench(work, *TINY, *SMALL, f"results_dir={work / 'a'}")
        second = kvbench(work, *TINY, *SMALL, f"results_dir={work / 'b'}")
        if first.rc or second.rc:
            return first if first.rc else second
        one, two = (rows(work / d / "niah_tiny_random/samples.jsonl") for d in ("a", "b"))
        same = [(r["key"], r["prediction"], r.get("score")) for r in one] == [
            (r["key"], r["prediction"], r.get("score")) for r in two
        ]
        return Outcome(0, first.out, first.err, check=same)

    return [
        Case("9j", "resume from a row whose key is a list", list_key, "refusal", "resume"),
        Case("9j", "two identical runs started together", two_together, "ok", "python -m kvbench (x2, at once)"),
        Case("9j", "stale .claims files are cleaned", stale_claims, "ok", "python -m kvbench"),
        Case("9", "kill -9 mid-run, then resume", kill9, "ok", "python -m kvbench; kill -9; python -m kvbench"),
        Case("9", "two runs give identical rows", deterministic, "ok", "python -m kvbench (x2)"),
    ]


def path_cases() -> list[Case]:
    razor = """
    from pathlib import Path
    from kvbench import api
    from kvbench.harness.sample import Sample
    model_dir = Path('models/My Model'); model_dir.mkdir(parents=True)
    (model_dir / 'config.json').write_text('{}')
    s = Sample('s', 'The sky is blue. ' * 20, 'Colour?', '', ['blue'], 'string_match_all', 2)
    for name in (str(model_dir.resolve()), str((model_dir / 'config.json').resolve())):
        lm = api.load_model('tiny_random', device='cpu', name=name)
        for method in ('razor',):
            rows = api.evaluate(lm, [s], method, budgets=[32])
            assert rows[0]['status'] == 'ok', rows[0].get('error')
    beside = sorted(str(p) for p in Path('models').rglob('*') if p.is_file())
    print('BESIDE', beside)
    """

    def local_model(work: Path) -> Outcome:
        outcome = api(work, razor)
        outcome.check = "BESIDE ['models/My Model/config.json']" in outcome.out
        return outcome

    network = """
    import socket
    lookups = []
    real = socket.getaddrinfo
    socket.getaddrinfo = lambda *a, **k: lookups.append(a[0]) or real(*a, **k)
    from kvbench import api
    task = api.load_task('ruler')
    data = task.load_qa_data()
    print('LOOKUPS', len(lookups), 'QA', sorted(data))
    """

    def ruler(work: Path) -> Outcome:
        outcome = api(work, network)
        outcome.check = "LOOKUPS 0 QA []" in outcome.out
        return outcome

    return [
        Case("9k", "razor head profiles of a local model stay in the cache dir", local_model, "ok", "API razor"),
        Case("9l", "task=ruler defaults make no network lookup", ruler, "ok", "API load_task('ruler')"),
    ]


def all_cases() -> list[Case]:
    return [
        *lm_eval_cases(),
        *report_cases(),
        *readme_cases(),
        *disk_cases(),
        *results_dir_cases(),
        *lock_cases(),
        *input_cases(),
        *calibrate_cases(),
        *store_cases(),
        *path_cases(),
    ]


def run_case(case: Case) -> Result:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvbench-audit-") as tmp:
        try:
            outcome = case.run(Path(tmp))
        except subprocess.TimeoutExpired:
            return Result(case, "traceback", False, time.perf_counter() - start, "timed out")
    seconds = time.perf_counter() - start
    if isinstance(outcome, str):
        return Result(case, "skipped", True, seconds, outcome)
    got = classify(outcome)
    expected = "one-line refusal" if case.expect == "refusal" else "ok"
    passed = got == expected and outcome.check
    detail = outcome.note or (message(outcome) if got != "ok" else "")
    if got == "one-line refusal" and not outcome.check and not outcome.note:
        detail = "check failed: " + detail
    return Result(case, got, passed, seconds, detail[:160])


def markdown(results: list[Result]) -> str:
    lines = ["| item | case | expected | got | pass | detail |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        expected = "one-line refusal" if r.case.expect == "refusal" else "ok"
        detail = r.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.case.item} | {r.case.name} | {expected} | {r.got} | {'yes' if r.passed else 'NO'} | "
                     f"{detail} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose item or name contains this")
    parser.add_argument("--markdown", type=Path, help="also write the table of cases as Markdown here")
    parser.add_argument("--shard", default="0/1", help="K/N: run every N-th case from the K-th (parallel shards)")
    parser.add_argument("--json", type=Path, help="also write each case's result here, one JSON object a line")
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        help="print the table and counts of --json files (a later file's result wins)",
    )
    args = parser.parse_args()
    if args.combine:
        latest = {}  # a case re-run in a later file counts once, with its latest result
        for line in (line for path in args.combine for line in path.read_text().splitlines()):
            record = json.loads(line)
            latest[(record["item"], record["name"])] = record
        combined = list(latest.values())
        order = {(c.item, c.name): index for index, c in enumerate(all_cases())}
        combined.sort(key=lambda r: order.get((r["item"], r["name"]), len(order)))
        cases = {(c.item, c.name): c for c in all_cases()}
        results = [Result(cases[(r["item"], r["name"])], r["got"], r["passed"], r["seconds"], r["detail"])
                   for r in combined]  # fmt: skip
    else:
        shard, shards = (int(part) for part in args.shard.split("/"))
        cases = [c for c in all_cases() if args.only in c.item or args.only in c.name][shard::shards]
        results = []
        for case in cases:
            result = run_case(case)
            results.append(result)
            mark = "pass" if result.passed else "FAIL"
            print(f"[{mark}] {case.item:3} {case.name}: {result.got} ({result.seconds:.0f} s) {result.detail}",
                  flush=True)  # fmt: skip
            if args.json:
                with args.json.open("a") as handle:
                    fields = {"got": result.got, "passed": result.passed, "seconds": result.seconds}
                    handle.write(json.dumps({"item": case.item, "name": case.name, **fields,
                                             "detail": result.detail}) + "\n")  # fmt: skip
    counts = Counter(r.got for r in results)
    print("\nclasses: " + ", ".join(f"{name} {counts.get(name, 0)}" for name in (*CLASSES, "skipped")))
    passed = sum(r.passed for r in results)
    print(f"as expected: {passed} of {len(results)}")
    if args.markdown:
        header = f"python: {platform.python_version()}, {platform.platform()}\n\n"
        args.markdown.write_text(header + markdown(results) + "\n")
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
