#!/usr/bin/env bash
# sttd side by side with WhisperLive: same machine, same load generator, same model, same audio.
#
# 1. installs WhisperLive in its own venv if it is not there (setup_whisperlive.sh);
# 2. starts WhisperLive's server on loopback with the tiny.en CTranslate2 model sttd bundles,
#    runs benchmarks/load.py against it (after one warm-up session) at N = $WL_N, each point
#    $RUNS times, stopping once it falls over, then stops it;
# 3. runs the same load.py against `sttd serve` (whisper backend) at N = $STTD_N, going on
#    until it falls over;
# 4. plots p95 final latency against N for both (plot_compare.py).
# The two servers never run at the same time, and both get OMP_NUM_THREADS=$THREADS and the same
# audio and start mode: LOAD_ARGS (default "--file sentences --together": 22 short sentences with
# 1.2 s pauses, every session starting within 100 ms).
#
# Usage, from the repository root:  benchmarks/peers/compare.sh
# Results: benchmarks/results/compare_whisperlive.json, compare_sttd.json, compare.png
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
RESULTS=benchmarks/results
RUNS=${RUNS:-2}
WL_N=${WL_N:-"1 2 4 8"}
STTD_N=${STTD_N:-"1 2 4 8 12 16 24"}
THREADS=${THREADS:-$(nproc)}
PORT=${WL_PORT:-9090}
read -r -a LOAD_ARGS <<<"${LOAD_ARGS:---file sentences --together}"
export OMP_NUM_THREADS=$THREADS

[[ -x benchmarks/peers/.venv-whisperlive/bin/python ]] || benchmarks/peers/setup_whisperlive.sh
uv sync --group bench --quiet

if [[ "${SKIP_WHISPERLIVE:-0}" != 1 ]]; then
  benchmarks/peers/whisperlive_server.sh "$PORT" 2>/tmp/whisperlive_server.log &
  wl_pid=$!
  trap 'kill $wl_pid 2>/dev/null || true' EXIT
  for _ in $(seq 60); do  # wait for its port
    (exec 3<>/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break
    sleep 1
  done
  # whisperlive_server.sh execs python, so $wl_pid is the server itself.
  # shellcheck disable=SC2086
  uv run --group bench python benchmarks/load.py --target whisperlive --url "ws://127.0.0.1:$PORT" \
      --pid "$wl_pid" --runs "$RUNS" --until-fail -n $WL_N "${LOAD_ARGS[@]}" --out "$RESULTS/compare_whisperlive.json"
  kill "$wl_pid"; wait "$wl_pid" 2>/dev/null || true
  trap - EXIT
fi

# shellcheck disable=SC2086
uv run --group bench python benchmarks/load.py --runs "$RUNS" --until-fail -n $STTD_N "${LOAD_ARGS[@]}" \
    --out "$RESULTS/compare_sttd.json"
uv run --group bench python benchmarks/peers/plot_compare.py \
    "$RESULTS/compare_sttd.json" "$RESULTS/compare_whisperlive.json" "$RESULTS/compare.png"
