"""`python -m kvbench.lm_eval <lm-eval arguments>`: lm-eval's own command line with the "kvbench" model
registered (lm-eval 0.4 has no plugin discovery), e.g.

    python -m kvbench.lm_eval --model kvbench --model_args model=smollm2,method=snapkv,budget=128 \
        --tasks <task> --include_path <dir>

Bad kvbench model args fail in one line. Needs the extra: pip install -e ".[lm_eval]".
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate

        import kvbench.integrations.lm_eval  # noqa: F401  (registers the "kvbench" model)
    except ImportError as err:
        print(f"kvbench: error: lm-eval is not installed ({err}); pip install -e '.[lm_eval]'", file=sys.stderr)
        sys.exit(2)
    try:
        cli_evaluate()
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"kvbench: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
