"""Read one file out of a streamed multipart/form-data body, within a byte limit.

The body is consumed chunk by chunk through werkzeug's sans-I/O multipart decoder, so an
oversized body is refused as soon as it passes the limit, whether or not it declared a
Content-Length, and only the wanted file's bytes are kept.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping

from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from sttd.errors import InvalidParam, PayloadTooLarge, UnsupportedMedia

__all__ = ["read_multipart_file"]

_MAX_PARTS = 16
_MAX_FIELD_BYTES = 4096


async def read_multipart_file(
    body: AsyncIterable[bytes],
    content_type: str,
    content_params: Mapping[str, str],
    *,
    field: str,
    max_bytes: int,
) -> tuple[bytes, dict[str, str]]:
    """The bytes of file field `field`, and the small text fields beside it.

    Raises `UnsupportedMedia` for a body that is not multipart/form-data, `PayloadTooLarge` once
    more than `max_bytes` arrived, and `InvalidParam` for a malformed body or a missing field.
    """
    if content_type != "multipart/form-data":
        raise UnsupportedMedia(f"send the audio as multipart/form-data with a '{field}' field, "
                               f"got content type {content_type or 'none'!r}")
    boundary = content_params.get("boundary", "")
    if not boundary:
        raise InvalidParam(field, "multipart/form-data needs a boundary parameter, got none")
    decoder = MultipartDecoder(boundary.encode("latin-1"), max_parts=_MAX_PARTS)
    received = 0
    current: str | None = None
    is_file = False
    found = False
    upload = bytearray()
    fields: dict[str, str] = {}
    field_bytes = bytearray()
    done = False

    def drain() -> bool:
        nonlocal current, is_file, found
        while True:
            event = decoder.next_event()
            if isinstance(event, NeedData):
                return False
            if isinstance(event, Epilogue):
                return True
            if isinstance(event, File):
                current, is_file = event.name, True
                found = found or event.name == field
            elif isinstance(event, Field):
                current, is_file = event.name, False
                field_bytes.clear()
            elif isinstance(event, Data):
                if is_file and current == field:
                    upload.extend(event.data)
                elif not is_file and current is not None:
                    field_bytes.extend(event.data)
                    if len(field_bytes) > _MAX_FIELD_BYTES:
                        raise InvalidParam(current, f"form field {current!r} must be at most "
                                                    f"{_MAX_FIELD_BYTES} bytes")
                    if not event.more_data:
                        fields[current] = field_bytes.decode("utf-8", "replace")

    try:
        async for chunk in body:
            received += len(chunk)
            if received > max_bytes:
                raise PayloadTooLarge(
                    f"request body must be at most {max_bytes} bytes (STT_MAX_UPLOAD_BYTES)")
            decoder.receive_data(chunk)
            done = drain()
            if done:
                break
        if not done:
            decoder.receive_data(None)
            drain()
    except ValueError as exc:
        raise InvalidParam(field, f"malformed multipart body: {exc}") from None
    if not found:
        raise InvalidParam(field, f"multipart body must have a '{field}' file field, got "
                                  f"{sorted(fields) or 'no fields'}")
    return bytes(upload), fields
