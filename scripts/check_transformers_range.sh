#!/usr/bin/env bash
# Run the cache/decode tests against the oldest and the newest transformers the pin allows (pyproject.toml),
# each installed into a scratch directory put first on PYTHONPATH (the .venv stays as it is).
#   bash scripts/check_transformers_range.sh [OLDEST] [NEWEST]      (defaults: 5.20.0 and the newest release)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OLDEST=${1:-5.20.0}
NEWEST=${2:-$($PY -m pip index versions transformers 2>/dev/null | sed -n 's/^transformers (\(.*\))$/\1/p')}
for version in "$OLDEST" "$NEWEST"; do
  target=$(mktemp -d)
  $PY -m pip install -q --disable-pip-version-check --no-deps --target "$target" "transformers==$version"
  echo "== transformers $version"
  PYTHONPATH="$target" $PY -W error::FutureWarning -c "import transformers; print(transformers.__version__)"
  PYTHONPATH="$target" $PY -m pytest -q -p no:cacheprovider -W error::FutureWarning \
    tests/test_cache_decode.py tests/test_methods_decode_time.py
  rm -rf "$target"
done
