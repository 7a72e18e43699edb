"""`python -m kvbench [overrides]`: the Hydra entry point.

Group choices (model=, method=, task=, experiment=) are checked before Hydra composes so that a typo fails in
one line with the valid names and the closest match; other bad input (budgets, compress, ...) is reported the
same way from inside the run.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from kvbench.config import CONF_DIR, check_overrides

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def fail(message: str) -> None:
    print(f"kvbench: error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from kvbench.app import run

    logging.getLogger("kvbench").setLevel(logging.INFO)
    try:
        run(cfg)
    except USER_ERRORS as err:
        if cfg.get("fail_fast"):
            raise
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)


def main() -> None:
    try:
        check_overrides([arg for arg in sys.argv[1:] if not arg.startswith("-")])
    except ValueError as err:
        fail(str(err))
    hydra_main()


if __name__ == "__main__":
    main()
