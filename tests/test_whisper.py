"""The whisper backend with the real bundled tiny.en model (CPU), kept short for CI."""

from __future__ import annotations

import copy
import json
import os
import re
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import huggingface_hub.constants
import numpy as np
import pytest
import trio
from trio_websocket import open_websocket_url

from sttd.audio import decode_wav, pcm16_to_float32
from sttd.backends import whisper
from sttd.backends.base import Request
from sttd.backends.whisper import WhisperBackend, WhisperOptions, _repeats_phrase
from sttd.errors import BackendError, UnsupportedLanguage
from sttd.settings import Settings
from tests.conftest import load_pcm, receive_until_close, send_pcm, silence, start_server

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
RATE_HZ = 16000


@pytest.fixture(scope="module")
def backend() -> Iterator[WhisperBackend]:
    yield WhisperBackend.load(WhisperOptions.from_settings(Settings()))


def _words(text: str) -> list[str]:
    return text.lower().translate(str.maketrans("", "", string.punctuation)).split()


def _fixture(name: str) -> np.ndarray:
    return pcm16_to_float32(load_pcm(name))


def _noises() -> dict[str, np.ndarray]:
    t = np.arange(5 * RATE_HZ) / RATE_HZ
    rng = np.random.default_rng(7)
    return {
        "silence": np.zeros(t.size),
        "white-noise": rng.standard_normal(t.size) * 0.05,
        "hum-50hz": 0.3 * np.sin(2 * np.pi * 50 * t),
        "hum-60hz": 0.3 * np.sin(2 * np.pi * 60 * t),
        "hum-50hz-harmonics": sum(0.1 / k * np.sin(2 * np.pi * 50 * k * t) for k in range(1, 6)),
        "rumble": np.convolve(rng.standard_normal(t.size), np.ones(64) / 8, "same") * 0.05,
    }


def test_whisper_on_a_cpu_runs_one_single_threaded_call_per_core(backend: WhisperBackend) -> None:
    """A second thread speeds one tiny.en call up by a few percent; a second call in parallel
    nearly doubles the work done (benchmarks/README.md): one lane per core the process may use."""
    cores = len(os.sched_getaffinity(0))
    assert (backend.preferred_lanes, backend.degraded()) == (cores, None)


@pytest.mark.parametrize(("threads", "lanes", "expected"), [
    (0, 0, (1, 8)), (2, 0, (2, 4)), (0, 3, (1, 3)), (16, 0, (16, 1))])
def test_threads_and_lanes_split_the_cores(threads: int, lanes: int,
                                           expected: tuple[int, int],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from sttd.backends import whisper

    monkeypatch.setattr(whisper.os, "sched_getaffinity", lambda _pid: set(range(8)))
    options = attrs.evolve(WhisperOptions.from_settings(Settings()), cpu_threads=threads,
                           lanes=lanes)
    assert whisper._threads_and_lanes(options, "cpu") == expected
    assert whisper._threads_and_lanes(options, "cuda") == (threads, lanes or 1)


def test_transcribes_speech_with_word_timings(backend: WhisperBackend) -> None:
    clips = [_fixture("ps_goforward"), _fixture("ps_librivox_0930")]
    first, second = backend.transcribe([Request(clip) for clip in clips])
    assert _words(first.text) == ["go", "forward", "10", "meters"]
    assert _words(second.text) == "he might even have been made amiable himself".split()
    assert [_words(w.word)[0] for w in first.words] == ["go", "forward", "10", "meters"]
    starts = [w.start_s for w in first.words]
    assert starts == sorted(starts)
    assert all(0 <= w.start_s <= w.end_s <= clips[0].size / RATE_HZ for w in first.words)
    assert first.confidence is not None and 0 < first.confidence <= 1
    assert first.language == "en"


def test_a_final_without_word_timings_is_not_aligned(backend: WhisperBackend,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The alignment is a pass of its own (a tenth to a quarter of a final's cost,
    benchmarks/word_timings.py): a final that wants no words skips it, text unchanged."""
    clip = _fixture("ps_goforward")
    [timed] = backend.transcribe([Request(clip)])
    aligned: list[int] = []
    find_alignment = backend._model.find_alignment

    def counted(tokenizer: object, text_tokens: list[list[int]], *args: object) -> object:
        aligned.append(len(text_tokens))
        return find_alignment(tokenizer, text_tokens, *args)

    monkeypatch.setattr(backend._model, "find_alignment", counted)
    [untimed] = backend.transcribe([Request(clip, word_timings=False)])
    assert aligned == []
    assert (untimed.text, untimed.words) == (timed.text, ())
    assert untimed.confidence is not None and 0 < untimed.confidence <= 1
    # In one batch, the final that wants its words still gets them.
    wanted, unwanted = backend.transcribe([Request(clip), Request(clip, word_timings=False)])
    assert aligned == [2]  # one pass for the batch
    assert wanted.words == timed.words and unwanted.words == ()


def test_each_final_in_a_batch_is_aligned_with_its_own_tokenizer(
        backend: WhisperBackend) -> None:
    """A tokenizer gives the alignment its language and task tokens and splits the text into
    words: per character for Japanese, at spaces for English. An English final batched after a
    Japanese one keeps its English words. tiny.en knows English alone, so the "Japanese"
    tokenizer here is tiny.en's with Japanese word splitting."""
    clip = _fixture("ps_goforward")
    english = backend._tokenizer("en")
    japanese = copy.copy(english)
    japanese.language_code = "ja"
    # " forwardly" is two tokens: one word split at spaces, two split per character.
    tokens = english.encode(" Go forwardly 10 meters.")
    output = whisper._Decoded(tokens, "Go forwardly 10 meters.", -0.1, 0.0, False)
    said = ["Go", "forwardly", "10", "meters."]
    alone = backend._align([Request(clip)], [output],
                           backend._encode(backend._features([clip], 1000)), [english])
    assert [w.word for w in alone[0]] == said
    batch = backend._align([Request(clip), Request(clip)], [output, output],
                           backend._encode(backend._features([clip, clip], 1000)),
                           [japanese, english])
    assert [w.word for w in batch[0]] == ["Go", "forward", "ly", "10", "meters."]
    assert [w.word for w in batch[1]] == said
    assert [t for w in batch[1] for t in (w.start_s, w.end_s)] == pytest.approx(
        [t for w in alone[0] for t in (w.start_s, w.end_s)], abs=0.021)


def test_only_a_thorough_final_gets_the_beam(backend: WhisperBackend,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    beams: list[int] = []
    generate = backend._generate

    def recorded(encoded: Any, prompts: list[list[int]], caps: list[int], beam: int,
                 *args: Any, **kwargs: Any) -> Any:
        beams.append(beam)
        return generate(encoded, prompts, caps, beam, *args, **kwargs)

    monkeypatch.setattr(backend, "_generate", recorded)
    clip = _fixture("ps_goforward")
    piece = Request(clip, thorough=True, origin="file")
    for requests in ([Request(clip)], [Request(clip, thorough=True)],
                     [Request(clip, "partial", thorough=True)],
                     [Request(clip, thorough=True)] * 3,  # a burst: greedy, to clear in time
                     [piece] * 3,  # a file's batch the engine had time for: the beam
                     [Request(clip, thorough=True)] * 3 + [piece]):  # in a burst, only it
        results = backend.transcribe(requests)
        assert all(_words(r.text) == ["go", "forward", "10", "meters"] for r in results)
    assert backend._options.beam_size == 5  # the default
    assert beams == [1, 5, 1, 1, 5, 1, 5]


def test_a_clip_past_30_s_without_word_timings_has_its_windows_text_and_confidence(
        backend: WhisperBackend) -> None:
    first, second = _fixture("ps_goforward"), _fixture("ps_librivox_0930")
    gap = np.zeros(30 * RATE_HZ - first.size, np.float32)
    clip = np.concatenate((first, gap, second))  # one per 30 s window
    [timed] = backend.transcribe([Request(clip)])
    [untimed] = backend.transcribe([Request(clip, word_timings=False)])
    assert untimed.text == timed.text
    assert _words(untimed.text) == ["go", "forward", "10", "meters", *"he might even have been "
                                    "made amiable himself".split()]
    assert timed.words and untimed.words == ()
    assert untimed.confidence is not None and 0 < untimed.confidence <= 1


@pytest.mark.parametrize("kind", ["partial", "final"])
@pytest.mark.parametrize("name", sorted(_noises()))
def test_no_text_from_silence_noise_or_hum(backend: WhisperBackend, name: str, kind: str) -> None:
    audio = _noises()[name].astype(np.float32)
    [result] = backend.transcribe([Request(audio, kind=kind)])  # type: ignore[arg-type]
    assert result.text == ""
    assert result.words == ()


def test_forced_prefix_starts_the_transcript(backend: WhisperBackend) -> None:
    [result] = backend.transcribe([Request(_fixture("ps_goforward"), prefix="Go forward")])
    assert result.text.startswith("Go forward")
    assert _words(result.text)[:2] == ["go", "forward"]


def test_hotwords_do_not_seed_a_loop(backend: WhisperBackend) -> None:
    # Without the loop guard this prompt made tiny.en say "10 of clubs" three times.
    [result] = backend.transcribe([Request(_fixture("ps_cards_001"),
                                           hotwords=("clubs", "spades"))])
    assert _words(result.text) == ["10", "of", "clubs"]


def _looping_clip() -> np.ndarray:
    """1 s of speech with a session's silence around it: tiny.en loops on it in its padded
    window without timestamps ("10 of clubs 10 of clubs ...")."""
    clip = _fixture("ps_cards_001")
    return np.concatenate([np.zeros(4800, np.float32), clip, np.zeros(3200, np.float32)])


def _record_decodes(backend: WhisperBackend, monkeypatch: pytest.MonkeyPatch
                    ) -> list[tuple[bool, str]]:
    """Each decode's (with timestamps, text) from now on, as the backend first made it."""
    first = backend._generate
    decoded: list[tuple[bool, str]] = []

    def generate(*args: Any, **kwargs: Any) -> Any:
        outputs = first(*args, **kwargs)
        decoded.extend((kwargs.get("durations_s") is not None, o.text) for o in outputs)
        return outputs

    monkeypatch.setattr(backend, "_generate", generate)
    return decoded


def _greedy_loops(backend: WhisperBackend, monkeypatch: pytest.MonkeyPatch, looped: str,
                  times: int) -> list[tuple[int, bool, str]]:
    """Make the backend's first `times` greedy decodes say `looped`, as tiny.en's own do on
    some CPUs and not on others (int8 kernels differ: it looped on an AMD EPYC without AVX-512,
    not on one with it); each decode's (beam, with timestamps, text) from now on."""
    first = backend._generate
    decodes: list[tuple[int, bool, str]] = []

    def generate(encoded: Any, prompts: list[list[int]], caps: list[int], beam: int,
                 tokenizers: list[Any], *, durations_s: list[float] | None = None) -> Any:
        outputs = first(encoded, prompts, caps, beam, tokenizers, durations_s=durations_s)
        if beam == 1 and sum(b == 1 for b, _, _ in decodes) < times:
            outputs = [whisper._Decoded(tokenizers[0].encode(" " + looped), looped,
                                        o.avg_logprob, o.no_speech_prob, True) for o in outputs]
        decodes.extend((beam, durations_s is not None, o.text) for o in outputs)
        return outputs

    monkeypatch.setattr(backend, "_generate", generate)
    return decodes


def test_a_short_final_that_loops_is_decoded_again_with_timestamps(
        backend: WhisperBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry with timestamps on the same encoder output ends the loop, so no 30 s window
    (an encoder pass eight times dearer) is needed.

    tiny.en's own first decode of this clip loops on some CPUs and not on others (int8 kernels
    differ: it looped on an AMD EPYC without AVX-512, not on one with it), so the first decode
    is made to loop as it does there (`_greedy_loops`); the retry is the model's own."""
    decodes = _greedy_loops(backend, monkeypatch, "10 of clubs " * 4 + "10 of clubs", times=1)

    def full_window(*_args: Any) -> Any:
        raise AssertionError("a longer window was used")

    monkeypatch.setattr(backend, "_retry_window", full_window)
    [result] = backend.transcribe([Request(_looping_clip(), kind="final")])
    # The first decode, then one retry with timestamps, whose text is the final's.
    assert [timed for _, timed, _ in decodes] == [False, True]
    assert _words(result.text) == ["10", "of", "clubs"]
    assert result.text == decodes[1][2]


def test_a_short_partial_that_loops_is_cut_where_it_starts_over_without_a_second_decode(
        backend: WhisperBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = _record_decodes(backend, monkeypatch)
    [result] = backend.transcribe([Request(_looping_clip(), kind="partial")])
    [(_, looped)] = decoded  # one decode, and it looped
    assert whisper._looks_repetitive(whisper._Decoded([], looped, 0, 0, False))
    assert _words(result.text) == ["10", "of", "clubs"]


@pytest.mark.parametrize(("text", "prefix", "first"), [
    ("go forward 10 meters. Go forward 10 meters. Go forward 10", "", "go forward 10 meters."),
    ("unless unless unless unless unless unless", "", "unless"),
    ("Eight of spades, four of- Eight of spades, four", "", "Eight of spades, four of-"),
    # A phrase that comes back after other words: cut where it comes back.
    ("Eight of spades, four of clubs, seven of hearts. Eight of spades, four of clubs", "",
     "Eight of spades, four of clubs, seven of hearts."),
    # The forced stable words are kept even where the loop would cut inside them.
    ("five five five five five five", "five five", "five five"),
    ("garbage that never starts over at all but ran to the cap", "", ""),
])
def test_a_looping_partial_keeps_its_first_pass(text: str, prefix: str, first: str) -> None:
    output = whisper._first_pass(whisper._Decoded([1, 2], text, -0.5, 0.1, True), prefix)
    assert output.text == first
    assert output.hit_cap is False and output.avg_logprob == -0.5


def test_digital_silence_is_not_decoded(backend: WhisperBackend,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def decode(*_args: Any) -> Any:
        raise AssertionError("silence reached the model")

    monkeypatch.setattr(backend, "_transcribe_short", decode)
    results = backend.transcribe([Request(np.zeros(2 * RATE_HZ, np.float32), kind=kind)
                                  for kind in ("final", "partial")])  # type: ignore[arg-type]
    assert [(r.text, r.words) for r in results] == [("", ()), ("", ())]


def test_mixed_batch_keeps_order(backend: WhisperBackend) -> None:
    names = ["ps_cards_001", "ps_goforward", "ps_librivox_0880"]
    requests = [Request(_fixture(names[0]), kind="partial"),
                Request(_fixture(names[1]), hotwords=("meters",)),
                Request(np.zeros(RATE_HZ, np.float32)),
                Request(_fixture(names[2]))]
    results = backend.transcribe(requests)
    assert _words(results[0].text)[-1] == "clubs"
    assert _words(results[1].text)[:2] == ["go", "forward"]
    assert results[2].text == ""
    assert _words(results[3].text)[:3] == ["he", "was", "not"]


@pytest.mark.parametrize(("first", "timestamped", "kept"), [
    # A phrase that comes back, said: the retry with timestamps says as much, the first stands.
    ("It was the season of light, it was the season of darkness.",
     "It was a season of light that was a season of darkness.",
     "It was the season of light, it was the season of darkness."),
    # A phrase brought back after the speech ended: the retry ends where the speech does.
    ("Eight of spades, four of clubs, seven of hearts. Eight of spades, four of clubs",
     "Eight of spades, four of clubs, seven of hearts.",
     "Eight of spades, four of clubs, seven of hearts."),
])
def test_a_final_suspect_for_a_phrase_coming_back_keeps_the_decode_that_says_it_all(
        backend: WhisperBackend, monkeypatch: pytest.MonkeyPatch, first: str,
        timestamped: str, kept: str) -> None:
    """The decodes are stand-ins: what is tested is which of the two the ladder keeps."""
    def generate(_encoded: Any, prompts: list[list[int]], *_args: Any, **kwargs: Any) -> Any:
        text = timestamped if kwargs.get("durations_s") is not None else first
        return [whisper._Decoded([1], text, -0.2, 0.01, False) for _ in prompts]

    monkeypatch.setattr(backend, "_generate", generate)
    monkeypatch.setattr(backend, "_align", lambda requests, *_: [[] for _ in requests])
    assert whisper._looks_repetitive(whisper._Decoded([], first, 0, 0, False), recurring=True)
    [result] = backend.transcribe([Request(_fixture("ps_librivox_0880"))])
    assert result.text == kept


def test_english_only_model_refuses_other_languages(backend: WhisperBackend) -> None:
    backend.check_language("en-GB")
    with pytest.raises(UnsupportedLanguage, match="English-only model"):
        backend.check_language("de")


def test_unreachable_model_name_fails_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackendError, match="STT_WHISPER_MODEL to a local CTranslate2 model"):
        WhisperBackend.load(WhisperOptions.from_settings(Settings(whisper_model="small.en")))


def test_long_recording_with_pauses_never_loops(backend: WhisperBackend) -> None:
    audio = decode_wav((DATA / "long_dev.wav").read_bytes())
    reference = (DATA / "refs.tsv").read_text().splitlines()[-1].split("\t")[1]
    # Decode it as the file API does: one request per 30 s window would be the worst case.
    pieces = [audio[i : i + 10 * RATE_HZ] for i in range(0, audio.size, 10 * RATE_HZ)]
    results = backend.transcribe([Request(piece) for piece in pieces])
    words = [w for r in results for w in _words(r.text)]
    assert not any(_repeats_phrase(r.text) for r in results)
    assert 0.8 * len(reference.split()) <= len(words) <= 1.2 * len(reference.split())


def test_a_final_looping_with_and_without_timestamps_gets_a_beam_search_before_a_window(
        backend: WhisperBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """"five five" on a -50 dBFS line: greedy decodes loop with and without timestamps; a beam
    search on the same encoder output says it, without a 30 s window's encoder pass.

    tiny.en's greedy decodes of this clip loop both ways on an AMD EPYC without AVX-512, not on
    one with it (int8 kernels differ), so they are made to loop as they do there
    (`_greedy_loops`); the beam search is the model's own."""
    five = decode_wav((DATA / "ps_cards_004.wav").read_bytes())
    clip = five + np.random.default_rng(2).normal(0.0, 10 ** (-50 / 20), five.size).astype(
        np.float32)
    request = Request(clip, kind="final")
    decodes = _greedy_loops(backend, monkeypatch, " ".join(["5"] * 12), times=2)
    windows: list[Any] = []
    retry_window = WhisperBackend._retry_window

    def counted(self: WhisperBackend, *args: Any) -> Any:
        windows.append(args)
        return retry_window(self, *args)

    monkeypatch.setattr(WhisperBackend, "_retry_window", counted)
    [result] = backend.transcribe([request])
    # Greedy, greedy with timestamps, the beam.
    assert [beam for beam, _, _ in decodes] == [1, 1, whisper._RETRY_BEAM]
    # The beam's answer ("5, 5" on the EPYC without AVX-512, "5" on the one with it).
    assert [result.text] == [text for beam, _, text in decodes if beam > 1]
    assert _words(result.text) in (["5"], ["5", "5"])
    assert windows == []


@pytest.mark.parametrize(("text", "loops"), [
    ("10 of clubs 10 of clubs 10 of clubs", True),
    ("Thank you. Thank you. Thank you.", True),
    (". . . . . .", True),
    ("no no no no no", True),
    ("five five", False),
    ("it was the best of times, it was the worst of times", False),
])
def test_repeated_phrases_are_detected(text: str, loops: bool) -> None:
    assert _repeats_phrase(text) is loops


async def test_server_streams_real_speech_with_stable_partials(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, backend="whisper")
    names = ["ps_librivox_0880", "ps_goforward"]
    audio = np.concatenate([part for name in names for part in (load_pcm(name), silence(1.0))])
    with trio.fail_after(120):
        async with open_websocket_url(server.ws_url("call_id=w&sample_rate=16000&partial_ms=300")) as ws:
            assert json.loads(await ws.get_message())["backend"] == "whisper"
            for offset in range(0, audio.size, 1600):  # 100 ms at a time, paced
                await send_pcm(ws, audio[offset : offset + 1600])
                await trio.sleep(0.02)
            await ws.send_message(json.dumps({"type": "end"}))
            messages, code = await receive_until_close(ws)
    finals = [m for m in messages if m["type"] == "final"]
    assert [_words(f["text"])[:3] for f in finals] == [["he", "was", "not"], ["go", "forward", "10"]]
    assert code == 1000
    for final in finals:
        assert final["words"] and final["confidence"] is not None
        partials = [m for m in messages
                    if m["type"] == "partial" and m["utterance_id"] == final["utterance_id"]]
        shown = ""
        for partial in partials:
            # A stable prefix never changes between partials: each one extends the last.
            assert partial["stable"].startswith(shown)
            assert re.sub(r"\s+", " ", f"{partial['stable']} {partial['unstable']}").strip() \
                == partial["text"]
            shown = partial["stable"]
        assert _words(final["text"])  # the final is a fresh decode; it may revise stable words


def test_a_long_phrase_said_twice_is_only_suspect() -> None:
    assert _repeats_phrase("10 of clubs 10 of clubs", suspect_doubles=True) is True
    assert _repeats_phrase("10 of clubs 10 of clubs") is False
    assert _repeats_phrase("go go", suspect_doubles=True) is False


def test_a_phrase_that_comes_back_later_is_suspect() -> None:
    looped = "Eight of spades, four of clubs, seven of hearts. Eight of spades, four of clubs"
    assert _repeats_phrase(looped, recurring=True) is True
    assert _repeats_phrase(looped, suspect_doubles=True) is False  # what a partial is held to
    assert _repeats_phrase(looped) is False
    assert _repeats_phrase("I think that we should go now and then we should rest",
                           recurring=True) is False


# --- CUDA's libraries (no GPU needed: what is opened, and the error when it cannot run) -------


class _WheelFile:
    """A file of an installed wheel, as importlib.metadata lists it."""

    def __init__(self, name: str, real: str) -> None:
        self._name, self._real = name, real

    def __str__(self) -> str:
        return f"nvidia/cublas/lib/{self._name}"

    def locate(self) -> str:
        return self._real


def test_the_cuda_extras_cublas_is_opened_lt_first_by_its_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from sttd.backends import whisper

    real = "/lib/x86_64-linux-gnu/libz.so.1"  # any loadable library stands in for cuBLAS
    listed = [_WheelFile(n, real) for n in ("__init__.py", "libcublas.so.12",
                                            "libcublasLt.so.12", "libnvblas.so.12")]
    opened: list[tuple[str, int]] = []
    real_cdll = whisper.ctypes.CDLL

    def cdll(path: str, mode: int) -> Any:
        opened.append((path, mode))
        return real_cdll(path, mode=mode)

    monkeypatch.setattr(importlib.metadata, "files",
                        lambda name: listed if name == "nvidia-cublas-cu12" else None)
    monkeypatch.setattr(whisper.ctypes, "CDLL", cdll)
    assert whisper.preload_cuda_libraries() == [real, real]  # Lt, then cuBLAS; no others
    assert [mode for _, mode in opened] == [whisper.ctypes.RTLD_GLOBAL] * 2

    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    assert whisper.preload_cuda_libraries() == []  # the system's libraries are used then


def test_a_model_that_cannot_run_on_cuda_stops_start_up_naming_the_fix() -> None:
    from sttd.backends.whisper import _check_cuda

    class NoCublas:
        model = type("M", (), {"is_multilingual": False})()

        def transcribe(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("Library libcublas.so.12 is not found or cannot be loaded")

    with pytest.raises(BackendError, match=r"libcublas\.so\.12.*uv sync --extra cuda"):
        _check_cuda(NoCublas())


def test_a_long_final_keeps_silence_after_it_in_its_window() -> None:
    """A 12.7 s final padded to its own length ends in the window's last frame, and tiny.en
    repeats its last phrase there (babble at 10 dB, benchmarks/noise.py)."""
    def bucket(seconds: float, kind: str = "final") -> int:
        return whisper._padding_bucket(Request(np.zeros(int(seconds * RATE_HZ), np.float32),
                                               kind=kind))  # type: ignore[arg-type]

    assert bucket(3.0) == 1000  # 10 s: the floor
    assert bucket(9.0) == 1500  # 9 s and 1.5 s of silence after it: the 15 s bucket
    assert bucket(12.7) == 1500
    assert bucket(14.0) == 2000
    assert bucket(2.0, "partial") == 400
    assert bucket(3.0, "partial") == 700


def test_a_hyphenated_word_is_one_word_with_its_times() -> None:
    """Whisper's alignment gives "cold-hearted" as "cold" and "-hearted" once the hyphen is
    merged forward: captions built from the words read "cold -hearted"."""
    def item(word: str, start: float, end: float, p: float = 0.9) -> dict[str, Any]:
        return {"word": word, "start": start, "end": end, "probability": p, "tokens": [1]}

    alignment = [item(" a", 0.0, 0.2), item(" cold", 0.2, 0.5), item("-hearted", 0.5, 0.9, 0.6),
                 item(" man", 0.9, 1.2), item(" -", 1.2, 1.3), item(" yes", 1.3, 1.5)]
    whisper._join_hyphenated(alignment)
    assert [(i["word"], i["start"], i["end"], i["probability"]) for i in alignment
            if i["word"].strip()] == [
        (" a", 0.0, 0.2, 0.9), (" cold-hearted", 0.2, 0.9, 0.6), (" man", 0.9, 1.2, 0.9),
        (" -", 1.2, 1.3, 0.9), (" yes", 1.3, 1.5, 0.9)]


def test_a_phrase_said_twice_in_a_row_is_still_a_loop_after_the_retry() -> None:
    looped = whisper._Decoded([], "we were all going direct to heaven, we were all going "
                              "direct to heaven, we were all", 0.0, 0.0, False)
    assert whisper._looks_repetitive(looped)
    assert not whisper._looks_repetitive(whisper._Decoded(
        [], "it was the age of wisdom, it was the age of foolishness", 0.0, 0.0, False))
    assert not whisper._looks_repetitive(whisper._Decoded([], "5 5", 0.0, 0.0, False))


async def test_quiet_speech_is_transcribed_from_a_file_and_a_live_stream(
        nursery: trio.Nursery) -> None:
    """'go forward ten meters' 40 dB down (peak -54 dBFS: a recorder with much headroom, a
    talker far from the microphone). The VAD used to take it for silence, and the upload came
    back 200 with no text; Whisper transcribes it, so sttd must hand it over."""
    import httpx

    from sttd.audio import encode_wav

    server = await start_server(nursery, backend="whisper")
    quiet = np.round(np.concatenate([silence(0.5), load_pcm("ps_goforward"), silence(1.0)])
                     * 0.01).astype(np.int16)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=120) as client:
        response = await client.post("/v1/stt/transcribe", files={
            "file": ("quiet.wav", encode_wav(pcm16_to_float32(quiet)))})
    assert response.status_code == 200
    assert _words(response.json()["text"])[:2] == ["go", "forward"]
    with trio.fail_after(120):
        async with open_websocket_url(server.ws_url("call_id=q&sample_rate=16000")) as ws:
            await ws.get_message()
            await send_pcm(ws, quiet)
            await ws.send_message(json.dumps({"type": "end"}))
            messages, code = await receive_until_close(ws)
    [final] = [m for m in messages if m["type"] == "final"]
    assert (_words(final["text"])[:2], code) == (["go", "forward"], 1000)
