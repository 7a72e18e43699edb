"""`python -m kvbench.lm_eval <lm-eval arguments>`: lm-eval's own command line with the "kvbench" model
registered (lm-eval 0.4 has no plugin discovery), e.g.

    python -m kvbench.lm_eval --model kvbench --model_args model=smollm2,method=snapkv,budget=128 \
        --tasks <task> --include_path <dir>

Bad kvbench model args fail in one line. Needs the extra: pip install -e ".[lm_eval]".

lm-eval's command line defaults `--device` to cuda:0; without `--device` (or a model arg `device=`) the adapter
runs where kvbench's `device=auto` resolves (CUDA when available, else CPU), so the commands work on a laptop.
"""

from __future__ import annotations

import sys


def with_device(args: list[str]) -> list[str]:
    """`args` with `--device auto` added when they evaluate a model and name no device (lm-eval's own default is
    cuda:0)."""
    evaluates = any(arg == "--model" or arg.startswith("--model=") for arg in args)
    if not evaluates or any(arg == "--device" or arg.startswith("--device=") for arg in args):
        return args
    return [*args, "--device", "auto"]


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate

        import kvbench.integrations.lm_eval  # noqa: F401  (registers the "kvbench" model)
    except ImportError as err:
        print(f"kvbench: error: lm-eval is not installed ({err}); pip install -e '.[lm_eval]'", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *with_device(sys.argv[1:])]
    try:
        cli_evaluate()
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"kvbench: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
