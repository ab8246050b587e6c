"""Who may call the server: bearer keys for the API, a token for /metrics, and CORS origins.

Both policies are values built once at start-up (`Access.from_settings` reads the key file, the
only I/O here) and asked per request. Credentials are compared in constant time against every
key, with no early exit, so the time a check takes says nothing about which key came close.
Keys and ``Authorization`` headers are never logged or echoed; `Access` keeps them out of its
repr.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Final

import attrs

from sttd.errors import ConfigError
from sttd.settings import Settings

__all__ = ["Access", "Cors"]

# How long a browser may cache a preflight's answer, seconds.
_PREFLIGHT_MAX_AGE_S: Final = 600
_PREFLIGHT_METHODS: Final = "GET, POST, OPTIONS"
_PREFLIGHT_HEADERS: Final = "Authorization, Content-Type"


@attrs.frozen
class Access:
    """The bearer keys the API accepts and the token /metrics wants; empty means open."""

    api_keys: tuple[bytes, ...] = attrs.field(default=(), repr=False)
    metrics_token: bytes = attrs.field(default=b"", repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Access:
        """Collect STT_API_KEYS, STT_API_KEYS_FILE and STT_METRICS_TOKEN.

        Raises `ConfigError` naming the variable for a key file that cannot be read or holds no
        key, and for a key or token that could never arrive in a header (not printable ASCII,
        or holding whitespace).
        """
        keys = _keys("STT_API_KEYS", settings.api_keys.split(","))
        if settings.api_keys_file:
            path = settings.api_keys_file
            try:
                with open(path, encoding="utf-8") as file:
                    lines = file.read().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError(f"STT_API_KEYS_FILE must name a readable file of keys, got "
                                  f"{path!r} ({reason})") from None
            # A comment counts as a blank line, so that errors give the file's line numbers.
            from_file = _keys("STT_API_KEYS_FILE", (
                "" if line.strip().startswith("#") else line for line in lines), unit="line")
            if not from_file:
                raise ConfigError(f"STT_API_KEYS_FILE must hold at least one key (one per "
                                  f"line), got none in {path!r}")
            keys += from_file
        token = _keys("STT_METRICS_TOKEN", [settings.metrics_token])
        return cls(api_keys=keys, metrics_token=token[0] if token else b"")

    def allows_api(self, authorization: str | None, token: str | None = None) -> bool:
        """Whether an ``Authorization`` header (or the WebSocket's `token` query value) has a key.

        True when no key is configured.
        """
        if not self.api_keys:
            return True
        presented = _bearer(authorization)
        if presented is None:
            presented = token
        return presented is not None and _matches_any(presented, self.api_keys)

    def allows_metrics(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header has the metrics token; True when none is set."""
        if not self.metrics_token:
            return True
        presented = _bearer(authorization)
        return presented is not None and _matches_any(presented, (self.metrics_token,))


@attrs.frozen
class Cors:
    """The origins browsers may call from; empty: no CORS headers at all."""

    origins: frozenset[str] = frozenset()
    any_origin: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Cors:
        """Parse STT_CORS_ORIGINS: comma-separated origins, or ``*`` for any."""
        origins = frozenset(origin.strip().rstrip("/") for origin in
                            settings.cors_origins.split(",") if origin.strip())
        return cls(origins=origins - {"*"}, any_origin="*" in origins)

    @property
    def enabled(self) -> bool:
        return self.any_origin or bool(self.origins)

    def allows(self, origin: str | None) -> bool:
        return origin is not None and (self.any_origin or origin in self.origins)

    def response_headers(self, origin: str | None) -> dict[str, str]:
        """Headers for a response to `origin`: Vary whenever CORS is on, the rest if allowed."""
        if not self.enabled:
            return {}
        # The answer depends on Origin, so caches must key on it even when it is refused.
        headers = {"Vary": "Origin"}
        if origin is not None and self.allows(origin):
            headers["Access-Control-Allow-Origin"] = origin
        return headers

    def preflight_headers(self, origin: str | None) -> dict[str, str]:
        """What a preflight from `origin` may do; nothing for an origin not allowed."""
        if not self.allows(origin):
            return {}
        return {
            "Access-Control-Allow-Methods": _PREFLIGHT_METHODS,
            "Access-Control-Allow-Headers": _PREFLIGHT_HEADERS,
            "Access-Control-Max-Age": str(_PREFLIGHT_MAX_AGE_S),
        }


def _keys(variable: str, entries: Iterable[str], *, unit: str = "entry") -> tuple[bytes, ...]:
    """The non-blank `entries`, stripped, as bytes; each must fit in a bearer header."""
    keys = []
    for number, entry in enumerate(entries, 1):
        key = entry.strip()
        if not key:
            continue
        if not (key.isascii() and key.isprintable()) or any(ch.isspace() for ch in key):
            # Name the entry, never its text: it is a secret.
            raise ConfigError(f"{variable} keys must be printable ASCII without spaces; "
                              f"{unit} {number} is not")
        keys.append(key.encode("ascii"))
    return tuple(keys)


def _bearer(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <credential>`` header, or None."""
    if authorization is None:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip()


def _matches_any(presented: str, keys: Iterable[bytes]) -> bool:
    """Whether `presented` is one of `keys`, comparing against every key in constant time."""
    candidate = presented.encode("utf-8", "replace")
    matched = False
    for key in keys:
        # No early exit: every key is compared whatever the outcome of the others.
        matched |= hmac.compare_digest(candidate, key)
    return matched
