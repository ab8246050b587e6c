"""Parsing shared by every protocol: query values, languages, hotwords, client JSON, sans I/O.

Each function raises `InvalidParam` naming the parameter (or `InvalidMessage` for a client
message), with the value quoted short: a query value can be kilobytes long.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final, Literal

from sttd.errors import InvalidMessage, InvalidParam
from sttd.settings import Settings

__all__ = [
    "MAX_HOTWORDS",
    "MAX_HOTWORD_CHARS",
    "MAX_TEXT_MESSAGE_BYTES",
    "MIN_PARTIAL_MS",
    "WIRE_DIGITS",
    "default_partial_ms",
    "dumps",
    "load_client_json",
    "parse_hotwords",
    "parse_task",
    "parse_language",
    "query_bool",
    "query_int",
    "quoted",
]

MAX_HOTWORDS: Final = 100
MAX_HOTWORD_CHARS: Final = 64
# Bytes of text a control message may hold; audio goes in binary frames.
MAX_TEXT_MESSAGE_BYTES: Final = 4096
# The shortest partial interval a client may ask for: shorter ones re-decode for little gain.
MIN_PARTIAL_MS: Final = 100
# Decimal places of probabilities and confidences in wire messages.
WIRE_DIGITS: Final = 4
_LANGUAGE: Final = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")
_MAX_QUOTED_CHARS: Final = 40  # of a bad value, in its error message


def quoted(value: str) -> str:
    """`value` quoted for an error message; a query value can be kilobytes long."""
    if len(value) <= _MAX_QUOTED_CHARS:
        return repr(value)
    return f"{value[:_MAX_QUOTED_CHARS]!r}..."


def default_partial_ms(settings: Settings) -> int:
    """The partial interval when the client asks for none (STT_STREAMING_CHUNK_SIZE_SEC), ms."""
    return max(round(settings.streaming_chunk_size_sec * 1000), MIN_PARTIAL_MS)


def parse_language(value: str, *, param: str = "language") -> str | None:
    """``auto`` (or empty) gives None; a BCP-47 tag is returned as given."""
    value = value.strip()
    if value in ("", "auto"):
        return None
    if not _LANGUAGE.match(value):
        raise InvalidParam(param, f"{param} must be 'auto' or a BCP-47 code such as 'en' or "
                                  f"'en-US', got {quoted(value)}")
    return value


def parse_task(value: str, *, param: str = "task") -> Literal["transcribe", "translate"]:
    """``transcribe`` (or empty) or ``translate`` (into English)."""
    value = value.strip().lower()
    if value in ("", "transcribe"):
        return "transcribe"
    if value == "translate":
        return "translate"
    raise InvalidParam(param, f"{param} must be transcribe or translate, got {quoted(value)}")


def parse_hotwords(value: str, *, param: str = "hotwords") -> tuple[str, ...]:
    """Split comma-separated hotwords, dropping blanks; bounded in count and length."""
    words = tuple(word.strip() for word in value.split(",") if word.strip())
    if len(words) > MAX_HOTWORDS:
        raise InvalidParam(param, f"{param} must hold at most {MAX_HOTWORDS} entries, "
                                  f"got {len(words)}")
    for word in words:
        if len(word) > MAX_HOTWORD_CHARS:
            raise InvalidParam(param, f"each of {param} must be at most {MAX_HOTWORD_CHARS} "
                                      f"characters, got {len(word)} in {word[:16]!r}...")
    return words


def query_int(query: Mapping[str, str], name: str, default: int, *,
              lo: int | None = None, hi: int | None = None) -> int:
    """An integer query parameter, `default` when absent, checked against [lo, hi]."""
    raw = query.get(name)
    if raw is None:
        return default
    # ASCII digits only: Python's int() also reads "16_000" and full-width "１６０００".
    digits = raw.strip()
    try:
        if not (digits.isascii() and digits.lstrip("+-").isdigit()):
            raise ValueError(digits)
        value = int(digits)  # a ValueError past Python's 4300 digits
    except ValueError:
        raise InvalidParam(name, f"{name} must be an integer, got {quoted(raw)}") from None
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise InvalidParam(name, f"{name} must be in {lo}..{hi}, got {value}")
    return value


def query_bool(query: Mapping[str, str], name: str, *, default: bool) -> bool:
    """``true`` or ``false`` (any case), `default` when absent."""
    raw = query.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise InvalidParam(name, f"{name} must be true or false, got {quoted(raw)}")
    return value == "true"


def load_client_json(text: str) -> dict[str, Any]:
    """A client's text message as a JSON object; raises `InvalidMessage` for anything else."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_MESSAGE_BYTES:
        raise InvalidMessage(f"text messages must be at most {MAX_TEXT_MESSAGE_BYTES} bytes, "
                             f"got {size}; send audio as binary frames")
    try:
        message = json.loads(text)
    except ValueError:
        raise InvalidMessage(f"text messages must be JSON objects, got {text[:40]!r}") from None
    except RecursionError:
        # 4096 bytes of brackets nest past the interpreter's recursion limit.
        raise InvalidMessage(f"text messages must be JSON objects, got JSON nested too deeply: "
                             f"{text[:40]!r}") from None
    if not isinstance(message, dict):
        raise InvalidMessage(f"text messages must be JSON objects, got {type(message).__name__}")
    return message


def dumps(message: Mapping[str, Any]) -> str:
    """Compact JSON for the wire."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)
