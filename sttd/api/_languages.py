"""Language codes and the names OpenAI's transcription API gives them (``english``, ...).

verbose_json answers name the language; sttd's own messages carry codes. `language_name` and
`language_code` convert between the two, for sttd's OpenAI route and for the remote backend
reading another server's answers.
"""

from __future__ import annotations

from typing import Final

__all__ = ["NAMES", "language_code", "language_name"]

# ISO 639-1 codes (and yue) to the lower-case names OpenAI's verbose_json uses.
NAMES: Final = {
    "af": "afrikaans", "ar": "arabic", "bg": "bulgarian", "ca": "catalan", "cs": "czech",
    "cy": "welsh", "da": "danish", "de": "german", "el": "greek", "en": "english",
    "es": "spanish", "et": "estonian", "fa": "persian", "fi": "finnish", "fr": "french",
    "he": "hebrew", "hi": "hindi", "hr": "croatian", "hu": "hungarian", "id": "indonesian",
    "it": "italian", "ja": "japanese", "ko": "korean", "lt": "lithuanian", "lv": "latvian",
    "ms": "malay", "nl": "dutch", "no": "norwegian", "pl": "polish", "pt": "portuguese",
    "ro": "romanian", "ru": "russian", "sk": "slovak", "sl": "slovenian", "sr": "serbian",
    "sv": "swedish", "th": "thai", "tr": "turkish", "uk": "ukrainian", "ur": "urdu",
    "vi": "vietnamese", "zh": "chinese", "yue": "cantonese",
}

_CODES: Final = {name: code for code, name in NAMES.items()}


def language_name(language: str) -> str:
    """OpenAI's name for a BCP-47 `language` (by its primary subtag), or `language` itself."""
    return NAMES.get(language.split("-")[0].lower(), language)


def language_code(name: str) -> str:
    """The code for one of OpenAI's language names (any case), or `name` itself."""
    return _CODES.get(name.lower(), name)
