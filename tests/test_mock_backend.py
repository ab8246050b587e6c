"""Tests for sttd.backends.mock: the fixture-matching backend behind every exact-transcript test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soxr  # type: ignore[import-untyped]  # no py.typed marker; one function is used

from sttd.audio import decode_wav, encode_wav
from sttd.backends.base import Request, Result
from sttd.backends.mock import MockBackend, default_references_dir
from sttd.errors import BackendError, UnsupportedLanguage

REFERENCES = Path(__file__).resolve().parents[1] / "references"


def _read_refs() -> dict[str, str]:
    rows = [line.split("\t") for line in (REFERENCES / "refs.tsv").read_text(encoding="utf-8").splitlines() if line]
    return {name: text for name, text in rows}


REFS = _read_refs()
NAMES = sorted(REFS)


@pytest.fixture(scope="module")
def backend() -> MockBackend:
    return MockBackend.from_directory()


def load(name: str) -> npt.NDArray[np.float32]:
    return decode_wav((REFERENCES / name).read_bytes())


def transcribe(backend: MockBackend, audio: npt.NDArray[np.float32], **kwargs: Any) -> Result:
    (result,) = backend.transcribe([Request(audio, **kwargs)])
    return result


# --- loading -------------------------------------------------------------------------------------


def test_references_hold_four_fixtures() -> None:
    assert NAMES == ["ps_cards_001.wav", "ps_goforward.wav", "ps_librivox_0880.wav", "ps_librivox_0930.wav"]
    assert default_references_dir() == REFERENCES


def test_from_directory_loads_every_fixture(backend: MockBackend) -> None:
    assert backend.name == "mock"
    # The protocol's defaults: one lane, never degraded, nothing to close.
    assert (backend.preferred_lanes, backend.degraded()) == (1, None)
    backend.close()
    assert sorted(f.name for f in backend.fixtures) == NAMES
    assert {f.name: " ".join(f.words) for f in backend.fixtures} == REFS
    assert MockBackend.from_directory(REFERENCES) == backend


def test_missing_directory_is_backend_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(BackendError, match=f"mock backend needs {missing / 'refs.tsv'}: No such file"):
        MockBackend.from_directory(missing)


def test_missing_fixture_wav_is_backend_error(tmp_path: Path) -> None:
    (tmp_path / "refs.tsv").write_text("gone.wav\tsome words\n")
    with pytest.raises(BackendError, match="mock fixture .*gone.wav: No such file"):
        MockBackend.from_directory(tmp_path)


@pytest.mark.parametrize(("table", "message"), [("", "lists no fixtures"),
                                                ("a.wav\n", "expected 'file<TAB>text' rows, got \\['a.wav'\\]")])
def test_bad_table_is_backend_error(tmp_path: Path, table: str, message: str) -> None:
    (tmp_path / "refs.tsv").write_text(table)
    with pytest.raises(BackendError, match=message):
        MockBackend.from_directory(tmp_path)


def test_silent_fixture_is_backend_error(tmp_path: Path) -> None:
    (tmp_path / "quiet.wav").write_bytes(encode_wav(np.zeros(16000, np.float32)))
    (tmp_path / "refs.tsv").write_text("quiet.wav\thush\n")
    with pytest.raises(BackendError, match="mock fixture quiet.wav holds no audio above 0.01 RMS"):
        MockBackend.from_directory(tmp_path)


def test_other_directory_with_its_own_fixtures(tmp_path: Path, backend: MockBackend) -> None:
    (tmp_path / "cards.wav").write_bytes((REFERENCES / "ps_cards_001.wav").read_bytes())
    (tmp_path / "refs.tsv").write_text("cards.wav\tace of spades\n")
    custom = MockBackend.from_directory(tmp_path)
    assert transcribe(custom, load("ps_cards_001.wav")).text == "ace of spades"
    assert transcribe(custom, load("ps_goforward.wav")).text == ""


# --- recognition ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_each_fixture_gives_its_reference_text(backend: MockBackend, name: str) -> None:
    result = transcribe(backend, load(name))
    assert result.text == REFS[name]
    assert [word.word for word in result.words] == REFS[name].split()
    assert (result.language, result.confidence) == ("en", 1.0)
    assert " ".join(word.word for word in result.words) == result.text
    starts = [word.start_s for word in result.words]
    assert starts == sorted(starts)
    assert all(0 <= word.start_s < word.end_s <= load(name).size / 16000 for word in result.words)


@pytest.mark.parametrize("name", NAMES)
def test_first_half_as_partial_gives_a_proper_word_prefix(backend: MockBackend, name: str) -> None:
    audio = load(name)
    words = transcribe(backend, audio[: audio.size // 2], kind="partial").text.split()
    reference = REFS[name].split()
    assert 0 < len(words) < len(reference)
    assert words == reference[: len(words)]


@pytest.mark.parametrize("name", NAMES)
def test_batch_gives_one_result_per_request_in_order(backend: MockBackend, name: str) -> None:
    others = [other for other in NAMES if other != name]
    results = backend.transcribe([Request(load(n)) for n in [name, *others, name]])
    assert [r.text for r in results] == [REFS[n] for n in [name, *others, name]]


def test_leading_silence_shifts_the_word_times(backend: MockBackend) -> None:
    audio = load("ps_goforward.wav")
    plain = transcribe(backend, audio)
    padded = transcribe(backend, np.concatenate((np.zeros(16000, np.float32), audio)))
    assert padded.text == plain.text == REFS["ps_goforward.wav"]
    assert [w.start_s - p.start_s for w, p in zip(padded.words, plain.words)] == pytest.approx([1.0] * 4)
    assert [w.end_s - p.end_s for w, p in zip(padded.words, plain.words)] == pytest.approx([1.0] * 4)


@pytest.mark.parametrize(
    "noise",
    [
        np.zeros(32000, np.float32),
        np.zeros(0, np.float32),
        np.random.default_rng(1).uniform(-0.5, 0.5, 32000).astype(np.float32),
        np.random.default_rng(2).normal(0, 0.1, 48000).astype(np.float32),
    ],
    ids=["silence", "empty", "uniform-noise", "gaussian-noise"],
)
def test_silence_and_noise_give_empty_text(backend: MockBackend, noise: npt.NDArray[np.float32]) -> None:
    result = transcribe(backend, noise)
    assert result == Result(text="", language="en")


def test_fragments_shorter_than_300_ms_give_empty_text(backend: MockBackend) -> None:
    audio = load("ps_cards_001.wav")
    # 90 and 250 ms from inside "ten": too little to match safely (it would correlate well by
    # chance, with a word of another fixture).
    assert transcribe(backend, audio[3200 : 3200 + 1440]).text == ""
    assert transcribe(backend, audio[3200 : 3200 + 4000]).text == ""
    assert transcribe(backend, audio[:8000]).text == "ten"  # the first half second


@pytest.mark.parametrize("name", NAMES)
def test_unknown_speech_gives_empty_text(backend: MockBackend, name: str) -> None:
    reversed_speech = load(name)[::-1].copy()  # speech-like energy, but not a fixture
    assert transcribe(backend, reversed_speech).text == ""


@pytest.mark.parametrize("name", NAMES)
def test_resampled_to_44k1_and_back_still_recognised(backend: MockBackend, name: str) -> None:
    audio = load(name)
    at_44k1 = np.asarray(soxr.resample(audio, 16000, 44100, quality="HQ"), dtype=np.float32)
    back = decode_wav(encode_wav(at_44k1, 44100))
    assert abs(back.size - audio.size) <= 1
    assert transcribe(backend, back).text == REFS[name]


@pytest.mark.parametrize("name", NAMES)
def test_eight_bit_still_recognised(backend: MockBackend, name: str) -> None:
    coarse = decode_wav(encode_wav(load(name), sample_format="pcm8"))
    assert not np.array_equal(coarse, load(name))
    assert transcribe(backend, coarse).text == REFS[name]


# --- language ------------------------------------------------------------------------------------


@pytest.mark.parametrize("language", [None, "en", "EN", "en-US", "en-GB"])
def test_english_or_auto_accepted(backend: MockBackend, language: str | None) -> None:
    backend.check_language(language)
    assert transcribe(backend, load("ps_cards_001.wav"), language=language).text == "ten of clubs"


@pytest.mark.parametrize("language", ["de", "fr-FR", "zh", "es-419"])
def test_other_languages_raise_unsupported_language(backend: MockBackend, language: str) -> None:
    message = f"language must be 'auto' or English \\('en'\\) for the mock backend, got '{language}'"
    with pytest.raises(UnsupportedLanguage, match=message):
        backend.check_language(language)
    with pytest.raises(UnsupportedLanguage, match=message):
        transcribe(backend, load("ps_cards_001.wav"), language=language)
