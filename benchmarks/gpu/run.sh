#!/usr/bin/env bash
# The GPU checks and figures, prepared to run in one go on a machine with an NVIDIA GPU, in
# under 8 minutes including model loads:
#
#   benchmarks/gpu/run.sh                 # writes benchmarks/results/gpu/*.json
#   OUT=/tmp/gpu benchmarks/gpu/run.sh    # elsewhere
#
# 1. the whisper backend on CUDA (bundled tiny.en, float16: no hub weights): the GPU tests with
#    STTD_REQUIRE_GPU=1, so a broken CUDA stack fails instead of skipping, then a capacity
#    sweep (benchmarks/load.py, 11 short utterances of real speech per session in real time,
#    N = 1, 8, 32 together-ish) and, in the same run, the CPU baseline at N = 1;
# 2. where Qwen3-ASR's weights are staged (STT_VLLM_MODEL a local folder, or the hub id in the
#    Hugging Face cache: run with HF_HUB_OFFLINE=1 then) and vLLM is installable: the qwen3 GPU
#    tests and a sweep at N = 8 and 32, as far as the time left allows.
#
# Each step runs under the time left of the 8-minute budget (STTD_GPU_BUDGET_S); a step with
# too little left is not started, and the summary says so. The first run needs the package
# registry (`uv sync --extra cuda`, and `--extra qwen3` for step 2); set STTD_GPU_NO_SYNC=1 where
# the environment is already installed. Results: summary.json (what ran, how it ended, how long
# it took, the GPU) and one JSON per sweep, with the command and the machine in each.
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-benchmarks/results/gpu}
BUDGET_S=${STTD_GPU_BUDGET_S:-480}
mkdir -p "$OUT"
START=$(date +%s)
STEPS=()

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# step NAME NEEDS_S COMMAND...: run COMMAND under the time left, if at least NEEDS_S is left.
step() {
    local name=$1 needs=$2
    shift 2
    local budget
    budget=$(left)
    if [ "$budget" -lt "$needs" ]; then
        echo "== $name: not run, ${budget}s left of ${BUDGET_S}s and it needs ${needs}s"
        STEPS+=("{\"step\": \"$name\", \"status\": \"not run: ${budget} s left, needs ${needs} s\"}")
        return 0
    fi
    echo "== $name (at most ${budget}s)"
    local began=$(date +%s) code=0
    timeout --kill-after=10 "$budget" "$@" || code=$?
    local took=$(( $(date +%s) - began ))
    local status="ok"
    [ "$code" -eq 0 ] || status="failed (exit $code)"
    [ "$code" -eq 124 ] && status="cut at the budget"
    STEPS+=("{\"step\": \"$name\", \"status\": \"$status\", \"seconds\": $took}")
    return 0
}

if ! GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader); then
    echo "nvidia-smi finds no NVIDIA GPU: this script is for a GPU machine" >&2
    exit 2
fi
echo "GPU: $GPU"

QWEN3=0
MODEL=${STT_VLLM_MODEL:-Qwen/Qwen3-ASR-1.7B}
if [ -d "$MODEL" ] || [ -d "${HF_HOME:-$HOME/.cache/huggingface}/hub/models--${MODEL//\//--}" ]; then
    QWEN3=1
fi

EXTRAS=(--extra cuda)
[ "$QWEN3" -eq 1 ] && EXTRAS+=(--extra qwen3)
if [ -z "${STTD_GPU_NO_SYNC:-}" ]; then
    step sync 60 uv sync --locked "${EXTRAS[@]}" --group bench
fi
RUN=(uv run --no-sync)
LOAD=("${RUN[@]}" python benchmarks/load.py --file sentences-once --runs 1 --stagger-s 2)
CUDA_SET=(--set STT_WHISPER_DEVICE=cuda --set STT_WHISPER_COMPUTE_TYPE=float16)

export STTD_REQUIRE_GPU=1
step whisper_cuda_tests 60 "${RUN[@]}" pytest -q -p no:cacheprovider tests/gpu/test_whisper_cuda.py \
    --junitxml "$OUT/tests_whisper_cuda.xml"
step whisper_cuda_sweep 150 "${LOAD[@]}" -n 1 8 32 --until-fail "${CUDA_SET[@]}" \
    --out "$OUT/load_whisper_cuda.json"
step whisper_cpu_baseline 70 "${LOAD[@]}" -n 1 --set STT_WHISPER_DEVICE=cpu \
    --out "$OUT/load_whisper_cpu_baseline.json"
if [ "$QWEN3" -eq 1 ]; then
    step qwen3_tests 200 "${RUN[@]}" pytest -q -p no:cacheprovider tests/gpu/test_qwen3_gpu.py \
        --junitxml "$OUT/tests_qwen3.xml"
    step qwen3_sweep 200 "${LOAD[@]}" --backend qwen3 -n 8 32 --out "$OUT/load_qwen3.json"
else
    STEPS+=("{\"step\": \"qwen3\", \"status\": \"not run: no staged weights for $MODEL\"}")
fi

{
    echo "{"
    echo "  \"command\": \"benchmarks/gpu/run.sh\","
    echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
    echo "  \"gpu\": \"$GPU\","
    echo "  \"cpu_model\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')\","
    echo "  \"budget_s\": $BUDGET_S,"
    echo "  \"seconds\": $(( $(date +%s) - START )),"
    echo "  \"steps\": ["
    for i in "${!STEPS[@]}"; do
        sep=","
        [ "$i" -eq $(( ${#STEPS[@]} - 1 )) ] && sep=""
        echo "    ${STEPS[$i]}$sep"
    done
    echo "  ]"
    echo "}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
grep -q '"failed\|cut at' "$OUT/summary.json" && exit 1
exit 0
