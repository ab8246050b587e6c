"""Language codes: BCP-47 codes to Whisper's, and to the names OpenAI's verbose_json gives.

The whisper backend's checks run here on a made-up multilingual model whose tokenizer lacks
Cantonese, as Whisper base's does (the real base model: tests/test_packaged_models.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sttd.api._languages import NAMES, language_code, language_name, whisper_language
from sttd.backends.base import Request
from sttd.backends.whisper import WhisperBackend, WhisperOptions
from sttd.errors import UnsupportedLanguage
from sttd.settings import Settings


@pytest.mark.parametrize(("language", "code"), [
    ("de", "de"), ("DE", "de"), ("de-DE", "de"), ("en-US", "en"), ("ZH", "zh"),
    ("zh-Hant", "zh"), ("zh-TW", "zh"), ("iw", "he"), ("jv", "jw"), ("jw", "jw"),
    ("nb", "no"), ("nb-NO", "no"), ("fil", "tl"), ("in", "id"), ("ji", "yi"), ("yue", "yue"),
    ("zh-yue", "yue"), ("zh-yue-HK", "yue"), ("xx", "xx")])
def test_bcp47_codes_become_whispers_codes(language: str, code: str) -> None:
    assert whisper_language(language) == code


def test_every_one_of_whispers_100_languages_has_openais_name() -> None:
    assert len(NAMES) == 100
    assert [language_name(c) for c in ("is", "sw", "haw", "jw", "jv", "iw", "nb", "zh-yue")] == [
        "icelandic", "swahili", "hawaiian", "javanese", "javanese", "hebrew", "norwegian",
        "cantonese"]
    assert language_name("en-GB") == "english" and language_name("xx") == "xx"
    assert [language_code(n) for n in ("icelandic", "Haitian Creole", "klingon")] == [
        "is", "ht", "klingon"]
    assert len(set(NAMES.values())) == 100  # so each name has one code


class _Tokenizer:
    """A multilingual tokenizer's special tokens, without Cantonese's (as Whisper base's)."""

    def token_to_id(self, token: str) -> int | None:
        return None if token == "<|yue|>" else 50259


@pytest.fixture
def base_like() -> WhisperBackend:
    model = SimpleNamespace(model=SimpleNamespace(device="cpu", is_multilingual=True),
                            hf_tokenizer=_Tokenizer())
    options = WhisperOptions.from_settings(Settings(whisper_model="base"))
    return WhisperBackend(model, options, "base")


@pytest.mark.parametrize("language", ["ZH", "zh-Hant", "en-US", "de-DE", "iw", "jv", "jw", "nb",
                                      "fil", "he"])
def test_a_multilingual_model_takes_codes_it_knows_under_any_alias(base_like: WhisperBackend,
                                                                   language: str) -> None:
    base_like.check_language(language)


@pytest.mark.parametrize("language", ["yue", "zh-yue", "ZH-YUE-HK"])
def test_cantonese_is_refused_by_a_model_without_it_rather_than_decoded_as_mandarin(
        base_like: WhisperBackend, language: str) -> None:
    with pytest.raises(UnsupportedLanguage,
                       match=rf"^language '{language}' \(cantonese\) is not one the whisper "
                             r"model base knows; use 'auto', or a model that knows it "
                             r"\(Whisper large-v3 knows Cantonese\)$"):
        base_like.check_language(language)


@pytest.mark.parametrize("language", ["xx", "deu", "und"])
def test_codes_whisper_does_not_know_are_refused(base_like: WhisperBackend,
                                                 language: str) -> None:
    with pytest.raises(UnsupportedLanguage, match=r"must be 'auto' or one Whisper knows"):
        base_like.check_language(language)


def test_a_given_language_is_decoded_and_reported_under_whispers_code(
        base_like: WhisperBackend) -> None:
    audio = np.zeros(16000, np.float32)
    requests = [Request(audio, language=language) for language in ("iw", "jv", "nb-NO", "zh-Hant")]
    # Given languages need no detection: neither the features nor the encoder output is read.
    unread = np.zeros((0, 80, 1000), np.float32)
    languages, probabilities = base_like._languages(requests, unread, None, 1000)
    assert (languages, probabilities) == (["he", "jw", "no", "zh"], [None] * 4)
