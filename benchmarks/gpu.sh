#!/usr/bin/env bash
# GPU figures, in at most 10 minutes (each part in its own process with a timeout; a part that would not fit the
# budget left is skipped and said so):
#   1. paper preset: DiT training steps, bf16, 256 px x 16 frames: step time, tokens/s, TFLOP/s, MFU, peak memory;
#   2. paper preset: Slice VAE decode of 512x512x144 with slicing on: peak GPU memory;
#   3. EasyAnimate V5.1 12B (released sizes, random weights, bf16): one process per v51.memory_mode (none,
#      vae_slicing, vae_tiling, fp8_layerwise, model_cpu_offload, sequential_cpu_offload and two combinations),
#      each denoising 2 steps at 512x512x49 with CFG and decoding: peak GPU memory, s/step (OOM is reported);
#   4. the Slice VAE decode of part 2 with slicing off (OOM is reported, not fatal), and the unsliced/sliced ratio.
# The Python side is benchmarks/gpu_bench.py; CI runs it on CPU at a tiny size (tests/test_gpu_bench.py).
#
# Usage:
#   benchmarks/gpu.sh                 run on a machine with a CUDA GPU; exits 2 when there is none
#   benchmarks/gpu.sh fetch-wheels    on a machine with the package index: download, into
#                                     .easyanimate/gpu-wheels (git-ignored), the wheels a bare GPU image lacks
#   GPU_BENCH_SMOKE=1 benchmarks/gpu.sh   no GPU needed: every part with --device cpu --tiny (checks the script)
#
# Python: $GPU_BENCH_PYTHON, else .venv/bin/python if its torch sees a GPU, else python3. The repo is put on
# PYTHONPATH (no `pip install -e .` needed: the GPU image's Python may be newer than pyproject allows). If
# diffusers/pydantic are missing there and .easyanimate/gpu-wheels holds wheels, they are installed into a
# temporary folder (offline); with the device tool: carry [".easyanimate/gpu-wheels"].
# Results: $GPU_BENCH_OUT, else $OUT (the device tool's folder), else .easyanimate/gpu-bench:
# gpu_bench.log and gpu_bench.jsonl. Extra arguments per part: DIT_ARGS, VAE_ARGS, V51_ARGS (e.g. DIT_ARGS="--batch 8",
# V51_ARGS="--steps 4"); V51_MODES replaces the list of memory modes (space-separated).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
WHEELS=$REPO/.easyanimate/gpu-wheels
# Packages the bench imports that the GPU image ('cuda', Python 3.12 with torch, transformers, accelerate,
# safetensors, pyyaml...) does not have. Versions are taken from this repo's .venv so both run the same code.
WHEEL_PACKAGES=(diffusers pydantic pydantic_core annotated_types typing_inspection typing_extensions)
REQUIRED_MODULES=(torch diffusers pydantic yaml safetensors huggingface_hub)

fetch_wheels() {
    local pip_python=python3 python_version=${GPU_WHEEL_PYTHON_VERSION:-3.12}
    if [[ -x .venv/bin/python ]]; then pip_python=.venv/bin/python; fi
    local specs
    specs=$("$pip_python" - "${WHEEL_PACKAGES[@]}" <<'EOF'
import importlib.metadata as md
import sys

pins = []
for name in sys.argv[1:]:
    try:
        pins.append(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pins.append(name)
print(" ".join(pins))
EOF
)
    echo "downloading for CPython $python_version manylinux x86_64: $specs"
    rm -rf "$WHEELS"
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086  # $specs is a list of requirement strings
    "$pip_python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" $specs
    ls -1 "$WHEELS"
    du -sh "$WHEELS"
    echo "carry .easyanimate/gpu-wheels to the GPU machine together with the working tree"
}

pick_python() {
    if [[ -n ${GPU_BENCH_PYTHON:-} ]]; then
        echo "$GPU_BENCH_PYTHON"
    elif [[ -x .venv/bin/python ]] &&
        .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        echo .venv/bin/python
    else
        echo python3
    fi
}

missing_modules() {
    "$PY" -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' \
        "${REQUIRED_MODULES[@]}"
}

FAILED=()
run_part() {  # run_part NAME SECONDS required|optional gpu_bench.py-arguments...
    local name=$1 limit=$2 need=$3
    shift 3
    local left=$((BUDGET - SECONDS - SUMMARY_RESERVE_S))
    if ((limit > left)); then limit=$left; fi
    if ((limit < 30)); then
        echo "!! $name: skipped, the ${BUDGET}s budget is spent"
        if [[ $need == required ]]; then FAILED+=("$name (skipped)"); fi
        return 0
    fi
    echo
    echo "==== $name (timeout ${limit}s, ${SECONDS}s elapsed)"
    local rc=0
    timeout --kill-after=10 "$limit" "$PY" benchmarks/gpu_bench.py "$@" --json "$RESULTS" || rc=$?
    case $rc in
        0) ;;
        124 | 137)
            echo "!! $name: timed out after ${limit}s"
            # The unsliced decode is measured only if it fits the budget: a timeout there is a finding.
            if [[ $need == required ]]; then FAILED+=("$name (timed out)"); fi
            ;;
        *) echo "!! $name: failed with exit status $rc"; FAILED+=("$name (exit $rc)") ;;
    esac
    return 0
}

# The V5.1 memory modes: "none" is required, the others optional (a timeout there is a finding, e.g. the slow
# sequential offload); each in a fresh process, so no hook, float8 cast or allocator state carries over.
V51_DEFAULT_MODES=(none vae_slicing vae_tiling fp8_layerwise model_cpu_offload sequential_cpu_offload
    model_cpu_offload+fp8_layerwise model_cpu_offload+fp8_layerwise+vae_tiling)
run_v51_parts() {
    local modes mode need
    # shellcheck disable=SC2206  # V51_MODES is a word list on purpose
    modes=(${V51_MODES:-${V51_DEFAULT_MODES[*]}})
    if ! "$PY" -c 'from diffusers import AutoencoderKLMagvit, EasyAnimatePipeline, EasyAnimateTransformer3DModel
import easyanimate.families.v51'; then
        echo "!! V5.1: diffusers' EasyAnimate classes or easyanimate.families.v51 do not import (see above): skipped"
        FAILED+=("V5.1 (imports)")
        return 0
    fi
    for mode in "${modes[@]}"; do
        need=optional
        if [[ $mode == none ]]; then need=required; fi
        # shellcheck disable=SC2086
        run_part "V5.1 12B denoise 512x512x49, memory_mode $mode" "${V51_TIMEOUT_S:-75}" "$need" \
            v51 --modes "$mode" "${smoke[@]}" ${V51_ARGS:-}
    done
}

main() {
    echo "==== easyanimate GPU benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi || echo "(nvidia-smi failed)"
    else
        echo "nvidia-smi: not found"
    fi

    PY=$(pick_python)
    echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo 'not runnable'))"
    if ! "$PY" - <<'EOF'; then
import os
import sys

try:
    import torch
except ImportError as exc:
    sys.exit(f"ERROR: torch is not importable ({exc})")
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}")
if not torch.cuda.is_available() and os.environ.get("GPU_BENCH_SMOKE") != "1":
    sys.exit(f"ERROR: no CUDA device visible to torch {torch.__version__}: benchmarks/gpu.sh needs a GPU machine "
             "(CPU smoke run: python benchmarks/gpu_bench.py dit --device cpu --tiny)")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
EOF
        exit 2
    fi

    local missing
    missing=$(missing_modules)
    if [[ -n $missing ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
        local site=${TMPDIR:-/tmp}/easyanimate-gpu-site
        echo "missing modules: $missing; installing carried wheels from $WHEELS into $site (offline)"
        "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "$WHEELS"/*.whl
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        missing=$(missing_modules)
    fi
    if [[ -n $missing ]]; then
        echo "ERROR: $PY lacks: $missing. Run 'benchmarks/gpu.sh fetch-wheels' where the package index is" \
            "reachable and carry .easyanimate/gpu-wheels, or set GPU_BENCH_PYTHON to a Python that has them."
        exit 3
    fi
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c 'import easyanimate.config, easyanimate.models.dit, easyanimate.models.vae'; then
        echo "ERROR: the easyanimate model code does not import with $PY (see the traceback above)"
        exit 3
    fi

    : >"$RESULTS"
    local smoke=()
    if [[ ${GPU_BENCH_SMOKE:-} == 1 ]]; then
        smoke=(--device cpu --tiny)
        echo "SMOKE RUN: CPU, tiny sizes"
    fi
    # shellcheck disable=SC2086  # DIT_ARGS / VAE_ARGS are word lists on purpose
    run_part "DiT training steps (bf16, 256 px x 16 frames)" "${DIT_TIMEOUT_S:-200}" required \
        dit "${smoke[@]}" ${DIT_ARGS:-}
    # shellcheck disable=SC2086
    run_part "VAE decode 512x512x144, slicing on" "${VAE_TIMEOUT_S:-80}" required \
        vae --slicing on "${smoke[@]}" ${VAE_ARGS:-}
    run_v51_parts
    # shellcheck disable=SC2086
    run_part "VAE decode 512x512x144, slicing off" "${VAE_FULL_TIMEOUT_S:-120}" optional \
        vae --slicing off "${smoke[@]}" ${VAE_ARGS:-}

    timeout 30 "$PY" benchmarks/gpu_bench.py summary --json "$RESULTS"
    echo "elapsed: ${SECONDS}s; results: $RESULTS"
    if ((${#FAILED[@]})); then
        printf '!! part not completed: %s\n' "${FAILED[@]}"
        exit 1
    fi
}

case ${1:-run} in
    fetch-wheels) fetch_wheels ;;
    run)
        BUDGET=${GPU_BENCH_BUDGET_S:-555}  # 10 minutes minus a margin for start-up and the log
        SUMMARY_RESERVE_S=25
        OUT_DIR=${GPU_BENCH_OUT:-${OUT:-$REPO/.easyanimate/gpu-bench}}
        mkdir -p "$OUT_DIR"
        RESULTS=$OUT_DIR/gpu_bench.jsonl
        export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
        export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}  # less fragmentation near OOM
        main 2>&1 | tee "$OUT_DIR/gpu_bench.log"
        ;;
    *) echo "usage: $0 [run|fetch-wheels]" >&2; exit 64 ;;
esac
