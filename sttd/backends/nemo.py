"""NVIDIA NeMo models exported to ONNX, run by sherpa-onnx (the ``nemo`` extra).

Theory of operation. `STT_NEMO_MODEL` names a folder in the layout sherpa-onnx loads NeMo
models from, and `inspect_model` tells its kind from the files and the ONNX metadata (read with
onnxruntime, which sttd has anyway), before sherpa-onnx ever sees it:

* ``model.onnx`` + ``tokens.txt``: a CTC model (Parakeet CTC, FastConformer CTC); with
  ``window_size`` in its metadata it is a cache-aware streaming one;
* ``encoder.onnx``, ``decoder.onnx``, ``joiner.onnx`` + ``tokens.txt``: a transducer (Parakeet
  RNNT/TDT, FastConformer or Nemotron streaming transducer), streaming likewise when the
  encoder's metadata has ``window_size`` (TDT when its ``url`` says so, as sherpa-onnx decides).

sherpa-onnx ends the whole process (``_Exit``) on most faults in a model, which no Python code
can catch; so everything it would die on that can be checked is checked first (metadata keys,
``<blk>`` last in tokens.txt, token counts against the outputs), and the folder is then loaded
once in a child process with a short decode (`_probe`), so a fault no check foresaw stops
start-up with the child's own message instead of killing the server later.

**Streaming models** decode each piece of audio once. A live utterance's requests carry its
audio so far and its `Request.stream_id`: the backend keeps one recognizer stream per id, feeds
it only the samples it has not seen, and decodes every ready stream of the call in ONE
``decode_streams`` per step, so many sessions' chunks share each encoder run. A partial is the
stream's running hypothesis (no re-decode); a final feeds the rest of the utterance and
``_FLUSH_S`` of silence (sherpa-onnx keeps the last partial window back until more audio comes),
finishes the stream, and forgets it. A request whose stream is gone (a speculative final that
speech then outlived, a partial arriving after its final) starts a new stream from the audio it
carries, and streams not touched for ``_IDLE_STREAM_S`` (a session that went away) are dropped.
File pieces (no stream id) get a stream of their own for the call.

**Offline models** decode each request whole, all requests of a call in one batched
``decode_streams``: finals once per utterance, partials by re-decoding, as whisper does.

Hotwords: transducers decoded with ``modified_beam_search`` and a ``bpe.vocab`` beside the model
take a session's hotwords per stream; elsewhere asking for them is refused (`Unsupported`).
Word timings come from the token timestamps (a word starts with a ``▁`` piece).

The backend runs one call at a time (one lane, `STT_NEMO_THREADS` threads inside it): the
streams are the state, and one call decodes all of them together anyway.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import numpy.typing as npt

from sttd.audio import SAMPLE_RATE_HZ
from sttd.backends.base import ASRBackend, RecognisedWord, Request, Result
from sttd.errors import BackendError, ConfigError, Unsupported, UnsupportedLanguage

__all__ = ["NemoBackend", "NemoModel", "NemoOptions", "inspect_model"]

log = logging.getLogger(__name__)

Kind = Literal["offline-transducer", "offline-ctc", "online-transducer", "online-ctc"]
DECODING_METHODS = ("greedy_search", "modified_beam_search")

# Silence fed after a final's audio: sherpa-onnx decodes a chunk only once the audio after it
# has come, so without it the last 0.5-0.8 s of speech would never be decoded.
_FLUSH_S = 0.8
# A stream not touched for this long belongs to a session that went away: dropped.
_IDLE_STREAM_S = 120.0
# Paths of modified beam search, and the boost hotwords get.
_MAX_ACTIVE_PATHS = 4
_HOTWORDS_SCORE = 1.5
# The longest a child process may take to load and try the model at start-up.
_PROBE_TIMEOUT_S = 300.0
_TRANSDUCER_FILES = ("encoder.onnx", "decoder.onnx", "joiner.onnx", "tokens.txt")
_CTC_FILES = ("model.onnx", "tokens.txt")
_STREAMING_KEYS = ("window_size", "chunk_shift", "cache_last_channel_dim1",
                   "cache_last_channel_dim2", "cache_last_channel_dim3", "cache_last_time_dim1",
                   "cache_last_time_dim2", "cache_last_time_dim3")
_WORD_START = "\u2581"  # SentencePiece's "▁": a piece that starts a word
_DEFAULT_FEATURE_DIM = 80


@attrs.frozen(kw_only=True)
class NemoOptions:
    """How to load and run the model (the STT_NEMO_* settings)."""

    model: str
    threads: int = attrs.field(validator=attrs.validators.ge(0))  # 0: every core we may use
    decoding: str = attrs.field(validator=attrs.validators.in_(DECODING_METHODS))


@attrs.frozen(kw_only=True)
class NemoModel:
    """What a model folder holds, as `inspect_model` found it."""

    folder: Path
    kind: Kind
    feature_dim: int
    vocab_size: int
    # Transducers with a bpe.vocab can be biased towards hotwords (modified beam search).
    hotwords: bool
    tdt: bool = False
    subsampling: int = 8

    @property
    def streaming(self) -> bool:
        return self.kind.startswith("online")

    @property
    def transducer(self) -> bool:
        return self.kind.endswith("transducer")


def inspect_model(folder: str) -> NemoModel:
    """The kind of NeMo model in `folder`; raises `ConfigError` saying what was found and what is
    expected when it is none that sherpa-onnx can load."""
    path = Path(folder).expanduser()
    if not folder or not path.is_dir():
        raise ConfigError(
            f"STT_NEMO_MODEL must be a folder holding a NeMo model exported to ONNX for "
            f"sherpa-onnx, got {folder!r}" + ("" if not folder else " (no such folder)"))
    present = sorted(p.name for p in path.iterdir())
    if all((path / name).is_file() for name in _TRANSDUCER_FILES):
        transducer = True
        meta, outputs, inputs = _onnx_facts(path / "encoder.onnx")
    elif all((path / name).is_file() for name in _CTC_FILES):
        transducer = False
        meta, outputs, inputs = _onnx_facts(path / "model.onnx")
    else:
        raise ConfigError(
            f"STT_NEMO_MODEL={folder} holds {', '.join(present) or 'nothing'}; expected a NeMo "
            f"model exported for sherpa-onnx: {' + '.join(_TRANSDUCER_FILES)} (a transducer) "
            f"or {' + '.join(_CTC_FILES)} (CTC)")
    where = f"STT_NEMO_MODEL={folder}: {'encoder' if transducer else 'model'}.onnx"
    streaming = "window_size" in meta
    required = ["vocab_size"] + (["pred_rnn_layers", "pred_hidden"] if transducer else [])
    if streaming:
        required += list(_STREAMING_KEYS)
    missing = [key for key in required if key not in meta]
    if missing:
        raise ConfigError(f"{where} lacks the metadata {', '.join(missing)} that sherpa-onnx "
                          "needs (export the model with sherpa-onnx's NeMo scripts)")
    if meta.get("normalize_type", "") not in ("", "per_feature"):
        raise ConfigError(f"{where} has normalize_type={meta['normalize_type']!r}; sherpa-onnx "
                          "supports per_feature or none")
    vocab_size = _int_meta(meta, "vocab_size", where)
    tokens = _tokens(path / "tokens.txt", folder)
    if tokens[-1] not in ("<blk>", "<blank>", "<eps>") or len(tokens) != vocab_size + 1:
        raise ConfigError(
            f"STT_NEMO_MODEL={folder}: tokens.txt must list vocab_size+1={vocab_size + 1} "
            f"tokens with the blank (<blk>) last, got {len(tokens)} ending in {tokens[-1]!r}")
    tdt = transducer and not streaming and "tdt" in meta.get("url", "").lower()
    if transducer:
        _check_transducer(path, vocab_size, tdt, streaming, folder)
    kind: Kind = (("online-" if streaming else "offline-")
                  + ("transducer" if transducer else "ctc"))  # type: ignore[assignment]
    feature_dim = (_int_meta(meta, "feat_dim", where) if "feat_dim" in meta
                   else inputs.get("audio_signal", _DEFAULT_FEATURE_DIM))
    return NemoModel(folder=path, kind=kind, feature_dim=feature_dim, vocab_size=vocab_size,
                     hotwords=transducer and (path / "bpe.vocab").is_file(), tdt=tdt,
                     subsampling=_int_meta(meta, "subsampling_factor", where)
                     if "subsampling_factor" in meta else 8)


def _onnx_facts(path: Path) -> tuple[dict[str, str], dict[str, int | None], dict[str, int]]:
    """A model's metadata, its outputs' last dimension, and its inputs' second dimension (where
    they are numbers), read with onnxruntime; `ConfigError` if it is not an ONNX model."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                               providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a bad file
        raise ConfigError(f"STT_NEMO_MODEL: {path} is not an ONNX model onnxruntime can load: "
                          f"{exc}") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    outputs = {o.name: (o.shape[-1] if o.shape and isinstance(o.shape[-1], int) else None)
               for o in session.get_outputs()}
    inputs = {i.name: i.shape[1] for i in session.get_inputs()
              if len(i.shape) > 1 and isinstance(i.shape[1], int)}
    return meta, outputs, inputs


def _int_meta(meta: dict[str, str], key: str, where: str) -> int:
    try:
        return int(meta[key])
    except ValueError:
        raise ConfigError(f"{where}: metadata {key} must be a whole number, "
                          f"got {meta[key]!r}") from None


def _tokens(path: Path, folder: str) -> list[str]:
    lines = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    if not lines:
        raise ConfigError(f"STT_NEMO_MODEL={folder}: tokens.txt is empty")
    return lines


def _check_transducer(path: Path, vocab_size: int, tdt: bool, streaming: bool,
                      folder: str) -> None:
    _, joiner_outputs, _ = _onnx_facts(path / "joiner.onnx")
    width = next(iter(joiner_outputs.values()), None)
    expected = vocab_size + 1
    if width is None or width < expected or (width != expected and not tdt):
        raise ConfigError(
            f"STT_NEMO_MODEL={folder}: joiner.onnx gives {width} scores a frame; expected "
            f"vocab_size+1={expected}" + (" plus durations (a TDT model needs 'tdt' in the "
                                          "encoder's url metadata)" if width else ""))
    _, decoder_outputs, _ = _onnx_facts(path / "decoder.onnx")
    if streaming and len(decoder_outputs) < 2:
        raise ConfigError(f"STT_NEMO_MODEL={folder}: decoder.onnx has one output; a NeMo "
                          "streaming transducer's decoder also returns its LSTM states")


@attrs.define(eq=False)
class _Live:
    """One live utterance's recognizer stream."""

    stream: Any
    fed: int  # samples of the utterance fed so far
    used_at: float


class NemoBackend(ASRBackend):
    """A NeMo model through sherpa-onnx: see the module docstring."""

    def __init__(self, recognizer: Any, model: NemoModel, options: NemoOptions) -> None:
        self._recognizer = recognizer
        self._model = model
        self._options = options
        self._live: dict[str, _Live] = {}
        self._started = 0  # streams begun for live utterances (each should begin once)
        # One call at a time (one lane): the live streams are shared state.
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "nemo"

    @property
    def incremental(self) -> bool:
        return self._model.streaming

    @property
    def model(self) -> NemoModel:
        return self._model

    @classmethod
    def load(cls, options: NemoOptions) -> NemoBackend:
        """Inspect, probe and load `options.model`; raises `ConfigError` (a folder that is not a
        model sherpa-onnx can load) or `BackendError` (sherpa-onnx missing, the probe failed)."""
        try:
            import sherpa_onnx  # noqa: F401
        except ImportError as exc:
            raise BackendError(f"the nemo backend needs sherpa-onnx (`uv sync --extra nemo`): "
                               f"{exc}") from None
        model = inspect_model(options.model)
        if options.decoding == "modified_beam_search" and not model.transducer:
            raise ConfigError(f"STT_NEMO_DECODING=modified_beam_search needs a transducer; "
                              f"{options.model} is a {model.kind} model (use greedy_search)")
        _probe(model, options)
        recognizer = build_recognizer(model, options)
        log.info("nemo.loaded model=%s kind=%s feature_dim=%d hotwords=%s",
                 model.folder.name, model.kind, model.feature_dim, _hotwords_ok(model, options))
        return cls(recognizer, model, options)

    def check_language(self, language: str | None) -> None:
        if language is not None and language.split("-")[0].lower() != "en":
            raise UnsupportedLanguage(
                f"language must be 'auto' or English ('en') for the NeMo model "
                f"{self._model.folder.name}, got {language!r}")

    def check_hotwords(self, hotwords: Sequence[str]) -> None:
        if hotwords and not _hotwords_ok(self._model, self._options):
            why = ("CTC models cannot be biased" if not self._model.transducer else
                   "it needs STT_NEMO_DECODING=modified_beam_search" if self._options.decoding
                   != "modified_beam_search" else "the model folder has no bpe.vocab")
            raise Unsupported(f"hotwords are not supported by this NeMo model ({why})",
                              param="hotwords")

    def transcribe(self, requests: Sequence[Request]) -> list[Result]:
        for request in requests:
            self.check_language(request.language)
        with self._lock:
            try:
                if self._model.streaming:
                    return self._streaming(requests)
                return self._offline(requests)
            except (RuntimeError, ValueError) as exc:
                raise BackendError(f"sherpa-onnx failed: {exc}") from exc

    # -- streaming models --------------------------------------------------------------------

    def _streaming(self, requests: Sequence[Request]) -> list[Result]:
        now = time.monotonic()
        self._forget_idle(now)
        streams = []
        for request in requests:
            live = self._live.get(request.stream_id) if request.stream_id else None
            if live is None or live.fed > request.audio.size:
                live = _Live(self._new_stream(request), 0, now)
                if request.stream_id:
                    self._live[request.stream_id] = live
                    self._started += 1
            live.stream.accept_waveform(SAMPLE_RATE_HZ, request.audio[live.fed :])
            live.fed, live.used_at = request.audio.size, now
            if request.kind == "final":
                live.stream.accept_waveform(
                    SAMPLE_RATE_HZ, np.zeros(int(_FLUSH_S * SAMPLE_RATE_HZ), np.float32))
                live.stream.input_finished()
                self._live.pop(request.stream_id, None)
            streams.append(live.stream)
        self._decode_ready(streams)
        return [self._result(self._recognizer.get_result_all(stream), request)
                for stream, request in zip(streams, requests, strict=True)]

    def _decode_ready(self, streams: list[Any]) -> None:
        """Decode every stream of the call as far as its audio goes, all in one batch a step."""
        recognizer = self._recognizer
        while ready := [stream for stream in streams if recognizer.is_ready(stream)]:
            recognizer.decode_streams(ready)

    def _forget_idle(self, now: float) -> None:
        idle = [key for key, live in self._live.items() if now - live.used_at > _IDLE_STREAM_S]
        for key in idle:
            del self._live[key]

    @property
    def live_streams(self) -> int:
        """Live utterances with a recognizer stream now."""
        return len(self._live)

    @property
    def streams_started(self) -> int:
        """Recognizer streams begun for live utterances so far (an utterance whose stream
        had to start over counts twice)."""
        return self._started

    # -- offline models ----------------------------------------------------------------------

    def _offline(self, requests: Sequence[Request]) -> list[Result]:
        streams = []
        for request in requests:
            stream = self._new_stream(request)
            stream.accept_waveform(SAMPLE_RATE_HZ, request.audio)
            streams.append(stream)
        self._recognizer.decode_streams(streams)
        return [self._result(stream.result, request)
                for stream, request in zip(streams, requests, strict=True)]

    # -- helpers -------------------------------------------------------------------------------

    def _new_stream(self, request: Request) -> Any:
        if request.hotwords and _hotwords_ok(self._model, self._options):
            return self._recognizer.create_stream("/".join(request.hotwords))
        return self._recognizer.create_stream()

    def _result(self, raw: Any, request: Request) -> Result:
        text = str(raw.text).strip()
        if not text:
            return Result("", language="en")
        words = _words(list(raw.tokens), self._timestamps(raw), request.duration_s)
        return Result(text=text, words=words if request.kind == "final" else (), language="en")

    def _timestamps(self, raw: Any) -> list[float]:
        stamps = [float(t) for t in raw.timestamps]
        if self._model.kind == "online-ctc" and self._model.subsampling == 8:
            # sherpa-onnx 2.0.1 counts streaming CTC frames as 4x subsampled (measured with the
            # models references/nemo/make_tiny_nemo.py makes): NeMo's are 8x.
            stamps = [2 * t for t in stamps]
        return stamps


def _hotwords_ok(model: NemoModel, options: NemoOptions) -> bool:
    return model.hotwords and options.decoding == "modified_beam_search"


def _words(tokens: list[str], stamps: list[float], duration_s: float
           ) -> tuple[RecognisedWord, ...]:
    """Words from BPE pieces and their start times (a ``▁`` piece, or one sherpa-onnx gives
    with a leading space, starts a word); a word ends where the next one starts, the last at the
    end of the audio."""
    if len(stamps) != len(tokens):
        return ()
    starts: list[tuple[str, float]] = []
    for piece, start in zip(tokens, stamps, strict=True):
        # sherpa-onnx gives the "▁" of a word's first piece as a space.
        if piece.startswith((_WORD_START, " ")) or not starts:
            starts.append((piece.lstrip(_WORD_START + " "), start))
        else:
            word, at = starts[-1]
            starts[-1] = (word + piece, at)
    words = []
    for i, (word, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else duration_s
        if word:
            words.append(RecognisedWord(word=word, start_s=start, end_s=max(end, start),
                                        probability=1.0))
    return tuple(words)


def build_recognizer(model: NemoModel, options: NemoOptions) -> Any:
    """The sherpa-onnx recognizer for `model` (call only on a folder `inspect_model` passed)."""
    import sherpa_onnx

    threads = options.threads or _cores()
    folder = model.folder
    hotwords: dict[str, Any] = {}
    if model.transducer:
        hotwords = {"decoding_method": options.decoding, "max_active_paths": _MAX_ACTIVE_PATHS}
        if _hotwords_ok(model, options):
            hotwords.update(hotwords_score=_HOTWORDS_SCORE, modeling_unit="bpe",
                            bpe_vocab=str(folder / "bpe.vocab"))
    if model.kind == "online-transducer":
        return sherpa_onnx.OnlineRecognizer.from_transducer(
            tokens=str(folder / "tokens.txt"), encoder=str(folder / "encoder.onnx"),
            decoder=str(folder / "decoder.onnx"), joiner=str(folder / "joiner.onnx"),
            num_threads=threads, sample_rate=SAMPLE_RATE_HZ, feature_dim=model.feature_dim,
            enable_endpoint_detection=False, **hotwords)
    if model.kind == "online-ctc":
        return sherpa_onnx.OnlineRecognizer.from_nemo_ctc(
            tokens=str(folder / "tokens.txt"), model=str(folder / "model.onnx"),
            num_threads=threads, sample_rate=SAMPLE_RATE_HZ, feature_dim=model.feature_dim,
            enable_endpoint_detection=False)
    if model.kind == "offline-transducer":
        return sherpa_onnx.OfflineRecognizer.from_transducer(
            encoder=str(folder / "encoder.onnx"), decoder=str(folder / "decoder.onnx"),
            joiner=str(folder / "joiner.onnx"), tokens=str(folder / "tokens.txt"),
            num_threads=threads, sample_rate=SAMPLE_RATE_HZ, feature_dim=model.feature_dim,
            model_type="nemo_transducer", **hotwords)
    return sherpa_onnx.OfflineRecognizer.from_nemo_ctc(
        model=str(folder / "model.onnx"), tokens=str(folder / "tokens.txt"),
        num_threads=threads, sample_rate=SAMPLE_RATE_HZ, feature_dim=model.feature_dim)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def _probe(model: NemoModel, options: NemoOptions) -> None:
    """Load `model` and decode a second of silence in a child process first: sherpa-onnx ends
    the process it runs in on faults no check here foresaw; raises `BackendError` with the
    child's message when it did."""
    argv = [sys.executable, "-m", "sttd.backends.nemo", json.dumps(
        {"folder": str(model.folder), "kind": model.kind, "feature_dim": model.feature_dim,
         "vocab_size": model.vocab_size, "hotwords": model.hotwords, "tdt": model.tdt,
         "subsampling": model.subsampling, "threads": 1, "decoding": options.decoding,
         "model": options.model})]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        raise BackendError(f"loading the NeMo model {model.folder} took over "
                           f"{_PROBE_TIMEOUT_S:g} s in a trial process") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
        raise BackendError(f"sherpa-onnx cannot run the NeMo model in {model.folder} "
                           f"(trial process exited {done.returncode}): "
                           f"{' | '.join(lines[-3:]) or 'no message'}")


def _trial(argument: str) -> None:
    """The child of `_probe`: load the model and decode one second of silence."""
    facts = json.loads(argument)
    model = NemoModel(folder=Path(facts["folder"]), kind=facts["kind"],
                      feature_dim=facts["feature_dim"], vocab_size=facts["vocab_size"],
                      hotwords=facts["hotwords"], tdt=facts["tdt"],
                      subsampling=facts["subsampling"])
    options = NemoOptions(model=facts["model"], threads=facts["threads"],
                          decoding=facts["decoding"])
    backend = NemoBackend(build_recognizer(model, options), model, options)
    silence: npt.NDArray[np.float32] = np.zeros(SAMPLE_RATE_HZ, np.float32)
    backend.transcribe([Request(silence, "final")])


if __name__ == "__main__":
    _trial(sys.argv[1])
