#!/usr/bin/env bash
# Shows, here, that the wheels of scripts/fetch_gpu_wheels.sh lift an image holding transformers 5.17 (the CUDA
# image's, below kvbench's pin) into the pin offline, so that kvbench runs there:
#   1 a throwaway venv holding what such an image holds for kvbench: transformers 5.17.0 with its requirements
#     (from the registry) and torch, without hydra-core, omegaconf, pandas, matplotlib or pytest;
#   2 gpu_check.sh's `deps` step (install_missing) in it, from the wheels folder only (--no-index; without any
#     network where `unshare -n` works), with pip's configuration files ignored;
#   3 transformers' version checked against the pin of pyproject.toml, then a tiny kvbench NIAH run with that venv
#     (or, with TORCH_SPEC=none, the exported tokenizer loaded by transformers).
#   bash scripts/check_gpu_wheels.sh     # the dev venv's python (3.11 here: torch is a local CPU wheel)
#   BASE_PYTHON=python3.12 TORCH_SPEC=none bash scripts/check_gpu_wheels.sh    # .whl/ itself, no torch
#   IMAGE_EXTRA="huggingface-hub==1.20.0 click==8.4.0" bash scripts/check_gpu_wheels.sh   # an image with older ones
# The wheels must match the venv's python: .whl/ when it was fetched for that version (the default, 3.12), else a
# scratch copy fetched by the same script with PY_VERSION set to it. The venv's torch is not the image's (2.11,
# CUDA): this covers transformers, its requirements and the other carried wheels, not torch or triton.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_PYTHON=${BASE_PYTHON:-.venv/bin/python}
FETCH_PYTHON=${FETCH_PYTHON:-.venv/bin/python}  # has pip's network access and the embedded GGUF for the tokenizer
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
IMAGE_TRANSFORMERS=${IMAGE_TRANSFORMERS:-5.17.0}
IMAGE_EXTRA=${IMAGE_EXTRA:-}  # more of the image's packages, as pip requirements separated by spaces
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
VENV=$SCRATCH/venv

"$BASE_PYTHON" -m venv "$VENV"
PY=$VENV/bin/python
py_version=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
echo "== 1 venv: python $py_version, transformers $IMAGE_TRANSFORMERS, torch: $TORCH_SPEC${IMAGE_EXTRA:+, $IMAGE_EXTRA}"
read -r -a image_packages <<< "transformers==$IMAGE_TRANSFORMERS $IMAGE_EXTRA"
[ "$TORCH_SPEC" != none ] && image_packages+=("$TORCH_SPEC")
"$PY" -m pip install --disable-pip-version-check -q "${image_packages[@]}"

WHEELS=.whl
if ! compgen -G "$WHEELS/pandas-*-cp${py_version/./}-*.whl" > /dev/null; then
    WHEELS=$SCRATCH/wheels
    echo "== wheels for python $py_version: fetching them to $WHEELS (.whl/ holds another python's)"
    DEST=$WHEELS PY_VERSION=$py_version PYTHON=$FETCH_PYTHON bash scripts/fetch_gpu_wheels.sh \
        > "$SCRATCH/fetch.log" 2>&1 || { cat "$SCRATCH/fetch.log"; exit 1; }
fi
echo "   wheels: $WHEELS ($(du -sh "$WHEELS" | cut -f1))"

NO_NETWORK=()
if unshare -n true 2> /dev/null; then
    NO_NETWORK=(unshare -n)
else
    echo "   (unshare -n is not available: offline only through pip's --no-index)"
fi
echo "== 2 deps (install_missing from scripts/gpu_check.sh)${NO_NETWORK:+, without network}"
eval "$(sed -n '/^install_missing() {$/,/^}$/p' scripts/gpu_check.sh)"
declare -F install_missing > /dev/null || { echo "install_missing not found in scripts/gpu_check.sh"; exit 1; }
export -f install_missing
export PY WHEELS
env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    "${NO_NETWORK[@]}" bash -c install_missing

echo "== 3 transformers against the pin, then kvbench"
"$PY" - << 'EOF'
import sys
import tomllib
from importlib import metadata

from packaging.requirements import Requirement

with open("pyproject.toml", "rb") as project:
    requirements = [Requirement(line) for line in tomllib.load(project)["project"]["dependencies"]]
pin = next(requirement for requirement in requirements if requirement.name == "transformers")
installed = metadata.version("transformers")
inside = pin.specifier.contains(installed)
print(f"transformers {installed}: {'inside' if inside else 'OUTSIDE'} the pin {pin.specifier}")
sys.exit(0 if inside else 1)
EOF
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$TORCH_SPEC" = none ]; then
    "${NO_NETWORK[@]}" "$PY" -c 'import sys
import hydra, matplotlib, omegaconf, pandas, transformers
tokenizer = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
print("imports ok; tokenizer", type(tokenizer).__name__, "encodes to", tokenizer("The magic number is")["input_ids"])' \
        "$WHEELS/tokenizer"
else
    "${NO_NETWORK[@]}" "$PY" -m kvbench model=tiny_random model.device=cpu threads=1 progress=false \
        "model.tokenizer=$WHEELS/tokenizer" task=niah "task.lengths=[128]" "task.depths=[50]" task.max_new_tokens=4 \
        "budget=[16]" "results_dir=$SCRATCH/runs" run_name=check_gpu_wheels
    find "$SCRATCH/runs" -name '*.csv' | head -3
fi
echo "== wheels install over transformers $IMAGE_TRANSFORMERS offline (python $py_version)"
