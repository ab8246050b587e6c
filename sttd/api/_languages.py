"""Language codes and the names OpenAI's transcription API gives them (``english``, ...).

verbose_json answers name the language; sttd's own messages carry codes. `language_name` and
`language_code` convert between the two, for sttd's OpenAI route and for the remote backend
reading another server's answers. `whisper_language` turns a BCP-47 code into the code Whisper
knows the language by, for the whisper backend and for the names here.
"""

from __future__ import annotations

from typing import Final

__all__ = ["NAMES", "language_code", "language_name", "whisper_language"]

# Whisper's 100 language codes (ISO 639-1 where there is one; haw, yue, and jw for Javanese) to
# the lower-case English names of openai-whisper's table, which OpenAI's verbose_json uses.
NAMES: Final = {
    "af": "afrikaans", "am": "amharic", "ar": "arabic", "as": "assamese", "az": "azerbaijani",
    "ba": "bashkir", "be": "belarusian", "bg": "bulgarian", "bn": "bengali", "bo": "tibetan",
    "br": "breton", "bs": "bosnian", "ca": "catalan", "cs": "czech", "cy": "welsh",
    "da": "danish", "de": "german", "el": "greek", "en": "english", "es": "spanish",
    "et": "estonian", "eu": "basque", "fa": "persian", "fi": "finnish", "fo": "faroese",
    "fr": "french", "gl": "galician", "gu": "gujarati", "ha": "hausa", "haw": "hawaiian",
    "he": "hebrew", "hi": "hindi", "hr": "croatian", "ht": "haitian creole", "hu": "hungarian",
    "hy": "armenian", "id": "indonesian", "is": "icelandic", "it": "italian", "ja": "japanese",
    "jw": "javanese", "ka": "georgian", "kk": "kazakh", "km": "khmer", "kn": "kannada",
    "ko": "korean", "la": "latin", "lb": "luxembourgish", "ln": "lingala", "lo": "lao",
    "lt": "lithuanian", "lv": "latvian", "mg": "malagasy", "mi": "maori", "mk": "macedonian",
    "ml": "malayalam", "mn": "mongolian", "mr": "marathi", "ms": "malay", "mt": "maltese",
    "my": "myanmar", "ne": "nepali", "nl": "dutch", "nn": "nynorsk", "no": "norwegian",
    "oc": "occitan", "pa": "punjabi", "pl": "polish", "ps": "pashto", "pt": "portuguese",
    "ro": "romanian", "ru": "russian", "sa": "sanskrit", "sd": "sindhi", "si": "sinhala",
    "sk": "slovak", "sl": "slovenian", "sn": "shona", "so": "somali", "sq": "albanian",
    "sr": "serbian", "su": "sundanese", "sv": "swedish", "sw": "swahili", "ta": "tamil",
    "te": "telugu", "tg": "tajik", "th": "thai", "tk": "turkmen", "tl": "tagalog",
    "tr": "turkish", "tt": "tatar", "uk": "ukrainian", "ur": "urdu", "uz": "uzbek",
    "vi": "vietnamese", "yi": "yiddish", "yo": "yoruba", "yue": "cantonese", "zh": "chinese",
}

# BCP-47 primary subtags that name one of Whisper's languages under another code: deprecated
# ISO 639-1 codes (iw, in, ji), Javanese's ISO code (Whisper says jw), Norwegian Bokmål (Whisper
# has one Norwegian besides Nynorsk) and Filipino (Whisper's Tagalog).
_ALIASES: Final = {"iw": "he", "in": "id", "ji": "yi", "jv": "jw", "nb": "no", "fil": "tl"}

_CODES: Final = {name: code for code, name in NAMES.items()}


def whisper_language(language: str) -> str:
    """Whisper's code for a BCP-47 `language` (any case): its primary subtag (``de-AT`` is
    ``de``, ``zh-Hant`` is ``zh``), under Whisper's code where that differs (``iw`` is ``he``,
    ``jv`` is ``jw``, ``nb`` is ``no``, ``fil`` is ``tl``); Cantonese, ``yue`` or ``zh-yue``
    (BCP-47's extended form), is ``yue``. A code Whisper does not know comes back as it is."""
    subtags = language.strip().lower().split("-")
    if subtags[:2] == ["zh", "yue"]:
        return "yue"
    return _ALIASES.get(subtags[0], subtags[0])


def language_name(language: str) -> str:
    """OpenAI's name for a BCP-47 `language` (see `whisper_language`), or `language` itself."""
    return NAMES.get(whisper_language(language), language)


def language_code(name: str) -> str:
    """The code for one of OpenAI's language names (any case), or `name` itself."""
    return _CODES.get(name.lower(), name)
