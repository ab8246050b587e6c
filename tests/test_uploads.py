"""`read_multipart_file` on its own: what it returns, how it is chunked, and every refusal with
its error type and parameter."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import IO, Any

import pytest
import trio

from sttd.errors import ClientError, InvalidParam, PayloadTooLarge, UnsupportedMedia
from sttd.admission._multipart import read_multipart_file

BOUNDARY = "b0und"
MP = "multipart/form-data"
FILE = b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav'
NOTE = b'Content-Disposition: form-data; name="note"'
# File data with CRs, LFs and near-boundaries in it, and at its edges.
TRICKY = b"\r\n\r\n--b0un\r\n--b0undx\r\n--b0und-x\r\n-\r\r\n\n\r--b0und\r\r--\r"
KIB = 1024
LIMIT = 64 * KIB  # what may come without a boundary, or before the end of a part's headers
UNBOUNDED = "no boundary or end of part headers within 65536 bytes"


def part(headers: bytes, data: bytes, boundary: str = BOUNDARY) -> bytes:
    return b"--%s\r\n%s\r\n\r\n%s\r\n" % (boundary.encode("latin-1"), headers, data)


def body(*parts: bytes, boundary: str = BOUNDARY, preamble: bytes = b"",
         epilogue: bytes = b"\r\n") -> bytes:
    return preamble + b"".join(parts) + b"--%s--" % boundary.encode("latin-1") + epilogue


def named(name: str, filename: str | None = None) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"'
    return (disposition + ("" if filename is None else f'; filename="{filename}"')).encode()


async def _stream(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def read(pieces: Iterable[bytes], *, params: dict[str, str] | None = None,
               content_type: str = MP, field: str = "file", max_bytes: int = 1 << 30
               ) -> tuple[bytes, dict[str, str]]:
    """The file's bytes and the text fields; the file must come positioned at its start."""
    upload, fields = await read_multipart_file(
        _stream(pieces), content_type, {"boundary": BOUNDARY} if params is None else params,
        field=field, max_bytes=max_bytes)
    with upload:
        assert upload.tell() == 0
        return upload.read(), fields


async def refusal(pieces: Iterable[bytes], **kwargs: Any) -> ClientError:
    with pytest.raises(ClientError) as caught:
        await read(pieces, **kwargs)
    return caught.value


def invalid(error: ClientError, param: str, match: str) -> bool:
    """`error` is `InvalidParam` for `param`, and says `match`."""
    assert type(error) is InvalidParam, error
    assert (error.param, match in str(error)) == (param, True), str(error)
    return True


def splits(data: bytes) -> Iterator[list[bytes]]:
    """`data` cut in two at every position, then in pieces of every size up to 16 bytes."""
    for at in range(len(data) + 1):
        yield [data[:at], data[at:]]
    for size in range(1, 17):
        yield [data[at : at + size] for at in range(0, len(data), size)]


# --- what comes back ------------------------------------------------------------------------------


async def test_returns_exactly_the_files_bytes_and_the_text_fields() -> None:
    data = body(part(NOTE, b"hello"), part(named("other", "b.wav"), b"not this one"),
                part(FILE, TRICKY), part(named("after"), "é".encode()),
                part(b"Content-Disposition: form-data", b"a part without a name"),
                preamble=b"a preamble\r\n", epilogue=b"\r\nan epilogue")
    assert await read([data]) == (TRICKY, {"note": "hello", "after": "é"})


async def test_the_result_does_not_depend_on_how_the_body_is_chunked() -> None:
    data = body(part(named("x[]"), b"1"), part(FILE, TRICKY), part(named("x[]"), b"\r\n"),
                part(NOTE, b"--b0und"), preamble=b"--b0undX\r\n", epilogue=b"--b0und--\r\n")
    expected = (TRICKY, {"x[]": "1,\r\n", "note": "--b0und"})
    assert await read([data]) == expected
    for pieces in splits(data):
        assert await read(pieces) == expected, [len(piece) for piece in pieces]


@pytest.mark.parametrize("data", [
    body(part(FILE, b"x"), part(b"Bad@Name: x", b"y")),  # the error names a byte of the body
    body(part(FILE, b"x"), part(FILE, b"y")),
    body(part(NOTE, b"n" * 4097)),
    body(*[part(named(f"f{index}"), b"x") for index in range(17)]),
    body(part(named("audio", "a.wav"), b"x"), part(named("note"), b"y")),
    body(part(FILE, b"x"))[:-12],
    body(part(b"Content-Type: audio/wav", b"x")),
    body(part(FILE, b"x")).replace(b"\r\n", b"\n"),
    body(preamble=b"a preamble\r\n"),
], ids=["bad header", "two files", "long field", "17 parts", "no file", "cut", "no disposition",
        "bare LF", "no parts"])
async def test_refusals_do_not_depend_on_how_the_body_is_chunked(data: bytes) -> None:
    error = await refusal([data])
    for pieces in splits(data):
        again = await refusal(pieces)
        assert (type(again), getattr(again, "param", None), str(again)) == (
            type(error), getattr(error, "param", None), str(error)), [len(p) for p in pieces]


async def test_parse_errors_say_where_in_the_body_and_are_not_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    data = body(part(FILE, b"x"), part(b"Bad@Name: x", b"y"))
    with caplog.at_level(logging.DEBUG):
        error = await refusal([data[:100], data[100:]])
    assert invalid(error, "file", f"malformed multipart body: Found invalid character "
                                  f"{ord('@')} in header at byte {data.index(b'@')}")
    assert caplog.records == []  # the client's error, answered and counted: not the server's


@pytest.mark.parametrize(("layout", "thread_writes"), [
    ([8 * 1024 * KIB - 1000, 2000, 1024 * KIB], [2000]),  # one chunk crosses 8 MiB
    ([4 * 1024 * KIB, 5 * 1024 * KIB], [5 * 1024 * KIB]),
    ([8 * 1024 * KIB, 1, 1024 * KIB], [1]),  # up to 8 MiB stays in memory; the next byte moves it
    ([8 * 1024 * KIB], []),
])
async def test_only_the_write_that_crosses_the_8_mib_spool_goes_to_a_thread(
        monkeypatch: pytest.MonkeyPatch, layout: list[int], thread_writes: list[int]) -> None:
    """Chunks of file data of the sizes in `layout`, after the part's head and before its end."""
    content = bytes(range(256)) * (sum(layout) // 256) + bytes(sum(layout) % 256)
    head, tail = part(FILE, b"").removesuffix(b"\r\n"), b"\r\n--b0und--\r\n"
    pieces, at = [head], 0
    for size in layout:
        pieces.append(content[at : at + size])
        at += size
    pieces.append(tail)
    in_threads: list[int] = []
    run_sync = trio.to_thread.run_sync

    async def counted(function: Any, data: bytes) -> Any:
        in_threads.append(len(data))
        return await run_sync(function, data)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    upload, _ = await read_multipart_file(_stream(pieces), MP, {"boundary": BOUNDARY},
                                          field="file", max_bytes=1 << 30)
    with upload:
        assert (upload.tell(), upload.read() == content) == (0, True)
        assert upload._rolled == bool(thread_writes)  # type: ignore[attr-defined]  # on disk
    assert in_threads == thread_writes


async def test_repeated_list_fields_are_joined_by_commas() -> None:
    data = body(part(named("x[]"), b"1"), part(NOTE, b"first"), part(named("x[]"), b"2"),
                part(FILE, b"f"), part(named("x[]"), b""), part(named("y[]"), b"a,b"),
                part(NOTE, b"last"))
    assert await read([data]) == (b"f", {"x[]": "1,2,", "y[]": "a,b", "note": "last"})


# --- line breaks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    b"", b"\r", b"\n", b"\r\n", b"\n\r", b"\r\r\n", b"\r\n\r\n", b"-", b"--", b"--b0und",
    b"\r\n--b0un", b"\r\n--b0undx", b"\r\n--b0und-", b"x\r\n-", b"\r--b0und--", TRICKY])
async def test_crs_lfs_and_near_boundaries_are_file_data(content: bytes) -> None:
    data = body(part(FILE, content))
    for pieces in splits(data):
        assert await read(pieces) == (content, {})


async def test_boundary_lines_may_have_padding_and_the_closing_one_needs_no_crlf() -> None:
    padded = body(part(NOTE, b"n"), part(FILE, b"f")).replace(b"--b0und\r\n", b"--b0und \t \r\n")
    assert await read([padded]) == (b"f", {"note": "n"})
    for pieces in splits(body(part(FILE, b"f"), epilogue=b"")):
        assert await read(pieces) == (b"f", {})


@pytest.mark.parametrize("data", [
    body(part(FILE, b"x")).replace(b"\r\n", b"\n"),
    body(part(FILE, b"x")).replace(b"\r\n", b"\r"),
    body(part(FILE, b"x")).replace(b"--b0und\r\n", b"--b0und\n", 1),
    body(part(FILE, b"x")).replace(b"filename=\"a.wav\"\r\n", b"filename=\"a.wav\"\n"),
    body(part(FILE, b"x")).replace(b"audio/wav\r\n", b"audio/wav\r"),
    body(part(FILE, b"x")).replace(b"\r\n--b0und--", b"\n--b0und--"),
])
async def test_line_breaks_must_be_crlf(data: bytes) -> None:
    assert invalid(await refusal([data]), "file", "malformed multipart body: ")


# --- which part is the file -----------------------------------------------------------------------


@pytest.mark.parametrize("disposition", [
    b"Content-Disposition: form-data; name=\"file\"; filename*=UTF-8''%C3%A9t%C3%A9.wav",
    b'Content-Disposition: form-data; name="file"; filename=""',
    b'Content-Disposition: form-data; name="file"; filename="\xc3\xa9t\xc3\xa9.wav"',
    b'Content-Disposition: form-data; name=file; filename=a.wav',
    b'content-disposition:form-data; name="file"; filename="a.wav"',
    b'Content-Disposition: attachment; name="file"; filename="a.wav"',
])
async def test_a_part_whose_disposition_has_a_filename_is_the_file(disposition: bytes) -> None:
    for headers in [b"Content-Type: audio/wav\r\n" + disposition,
                    disposition + b"\r\nContent-Type: audio/wav\r\nX-Other: 1"]:
        assert await read([body(part(headers, b"RIFF"))]) == (b"RIFF", {})


async def test_the_field_without_a_filename_is_the_file_too() -> None:
    """``curl -F "file=<a.wav"`` and aiohttp's add_field send none: such a file was taken for a
    text field and refused as one over 4096 bytes."""
    for headers in [named("file"), b'Content-Disposition: form-data; name="file"; filename']:
        assert await read([body(part(headers, b"RIFF" + bytes(8000)))]) == (
            b"RIFF" + bytes(8000), {})
    assert invalid(await refusal([body(part(named("file"), b"1"), part(FILE, b"2"))]), "file",
                   "multipart body must have one 'file' file field, got more")


async def test_a_part_without_a_filename_is_a_text_field() -> None:
    assert await read([body(part(named("note"), b"n"), part(FILE, b"F"))]) == (
        b"F", {"note": "n"})


async def test_a_header_that_is_not_utf8_is_read_as_latin1() -> None:
    """A filename in a legacy charset (curl sends it as the file system spells it): the file
    is taken; its name is never used."""
    assert await read([body(part(FILE.replace(b"a.wav", b"\xe9t\xe9.wav"), b"RIFF"))]) == (
        b"RIFF", {})


async def test_the_field_may_have_any_name_and_errors_name_it() -> None:
    data = body(part(named("audio", "a.wav"), b"A"), part(FILE, b"F"))
    assert await read([data], field="audio") == (b"A", {})
    assert invalid(await refusal([body(part(FILE, b"F"))], field="audio"), "audio",
                   "multipart body must have a 'audio' file field, got file 'file'")
    assert invalid(await refusal([b"garbage"], field="audio"), "audio", "malformed")


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json", "", "multipart/mixed", "audio/wav"])
async def test_a_body_that_is_not_form_data_is_unsupported_media(content_type: str) -> None:
    error = await refusal([body(part(FILE, b"x"))], content_type=content_type)
    assert type(error) is UnsupportedMedia
    assert "multipart/form-data with a 'file' field" in str(error)


@pytest.mark.parametrize(("params", "match"), [
    ({}, "needs a boundary parameter, got none"),
    ({"boundary": ""}, "needs a boundary parameter, got none"),
    ({"boundary": "\u20ac"}, "the multipart boundary must be Latin-1 text, got '\u20ac'"),
])
async def test_a_missing_or_undecodable_boundary_is_refused(params: dict[str, str],
                                                            match: str) -> None:
    assert invalid(await refusal([body(part(FILE, b"x"))], params=params), "file", match)


@pytest.mark.parametrize("boundary", ["b" * 900, "a.*(+?[]$^", "with space", "-", "\xe9"])
async def test_any_latin_1_boundary_works(boundary: str) -> None:
    data = body(part(FILE, TRICKY, boundary), part(NOTE, b"n", boundary), boundary=boundary)
    assert await read([data], params={"boundary": boundary}) == (TRICKY, {"note": "n"})


@pytest.mark.parametrize(("data", "match"), [
    (b"", "it ends before its first boundary"),
    (b"hello, this is not multipart at all", "it ends before its first boundary"),
    (body(part(FILE, b"x", "other"), boundary="other"), "it ends before its first boundary"),
    (body(part(FILE, b"x"))[:-12], "it ends before its closing boundary"),
    (b"--b0und\r\n" + FILE + b"\r\nRIFF", "it ends before its closing boundary"),
    (body(part(b"Content-Type: audio/wav", b"x")), "a part has no Content-Disposition header"),
    (body(part(FILE + b"\r\nno colon here", b"x")), "Found invalid character"),
    (body(part(FILE + b"\r\n folded: x", b"x")), "Found invalid character"),
])
async def test_a_malformed_body_is_refused(data: bytes, match: str) -> None:
    assert invalid(await refusal([data]), "file", f"malformed multipart body: {match}")


async def test_at_most_16_parts() -> None:
    fields = [part(named(f"f{index}"), b"x") for index in range(15)]
    assert (await read([body(*fields, part(FILE, b"F"))]))[0] == b"F"
    assert invalid(await refusal([body(*fields, part(FILE, b"F"), part(NOTE, b"n"))]), "file",
                   "multipart body must have at most 16 parts, got more")


async def test_a_text_field_holds_at_most_4096_bytes_and_its_error_names_it() -> None:
    assert await read([body(part(NOTE, b"n" * 4096), part(FILE, b"F"))]) == (
        b"F", {"note": "n" * 4096})
    assert invalid(await refusal([body(part(NOTE, b"n" * 4097), part(FILE, b"F"))]), "note",
                   "form field 'note' must be at most 4096 bytes")
    other_file = part(named("big", "b.bin"), bytes(5000))  # only text fields are limited
    assert (await read([body(other_file, part(FILE, b"F"))]))[0] == b"F"


async def test_two_files_for_the_field_are_refused() -> None:
    assert invalid(await refusal([body(part(FILE, b"1"), part(FILE, b"2"))]), "file",
                   "multipart body must have one 'file' file field, got more")


@pytest.mark.parametrize(("parts", "seen"), [
    ([], "no fields"),
    ([part(named("b"), b"x"), part(named("a"), b"x"), part(named("audio", "a.wav"), b"x"),
      part(named("files"), b"x")], "field 'a', field 'b', field 'files', file 'audio'"),
    ([part(named("n" * 60, "a.wav"), b"x")], f"file '{'n' * 40}'"),
])
async def test_a_missing_file_is_refused_with_the_parts_it_saw(parts: list[bytes],
                                                               seen: str) -> None:
    assert invalid(await refusal([body(*parts)]), "file",
                   f"multipart body must have a 'file' file field, got {seen}")


async def test_many_headers_within_64_kib_are_taken() -> None:
    headers = FILE + b"".join(b"\r\nX-H%d: %s" % (index, b"v" * 100) for index in range(500))
    assert await read([body(part(headers, b"F"))]) == (b"F", {})


@pytest.mark.parametrize("chunk_bytes", [KIB, 1 << 20])
async def test_at_most_64_kib_of_preamble_part_headers_and_epilogue(chunk_bytes: int) -> None:
    def cut(data: bytes) -> list[bytes]:
        return [data[at : at + chunk_bytes] for at in range(0, len(data), chunk_bytes)]

    file = part(FILE, b"F")
    filler = b"\r\nX-Filler: "
    # The first boundary line (--b0und CRLF) must end within 64 KiB of the start of the body.
    taken = [body(file, preamble=b"p" * (LIMIT - 11) + b"\r\n"),
             body(part(FILE + filler + b"a" * (LIMIT - len(FILE) - 30), b"F")),
             body(file, epilogue=b"e" * LIMIT)]
    for data in taken:
        assert await read(cut(data)) == (b"F", {})
    refused = [(body(file, preamble=b"p" * (LIMIT - 10) + b"\r\n"), UNBOUNDED),
               (body(part(FILE + filler + b"a" * LIMIT, b"F")), UNBOUNDED),
               (body(part(FILE + b"\r\nX-H: v" * (LIMIT // 6), b"F")), UNBOUNDED),
               (body(part(FILE + (filler + b"a" * (LIMIT // 2)) * 2, b"F")), UNBOUNDED),
               (body(file, epilogue=b"e" * (LIMIT + 1)),
                "it does not end within 65536 bytes of its closing boundary")]
    for data, match in refused:
        assert invalid(await refusal(cut(data)), "file", f"malformed multipart body: {match}")


async def test_the_epilogue_is_counted_from_the_end_of_the_closing_boundary() -> None:
    head = part(FILE, b"F")
    for size, taken in [(LIMIT, True), (LIMIT + 1, False)]:
        data = body(part(FILE, b"F"), epilogue=b"e" * size)
        for at in range(len(head) - 4, len(head) + len(b"--b0und--") + 4):
            if taken:
                assert await read([data[:at], data[at:]]) == (b"F", {})
            else:
                assert invalid(await refusal([data[:at], data[at:]]), "file", "closing boundary")


@pytest.mark.parametrize("start", [b"", b"--b0und\r\nX-Filler: ", body(part(FILE, b"F"))])
async def test_a_body_that_never_reaches_a_boundary_is_refused_within_64_kib(start: bytes) -> None:
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        yield start
        while True:
            pulled += 1
            yield b"a" * KIB

    with pytest.raises(InvalidParam, match="within 65536 bytes") as caught:
        await read_multipart_file(endless(), MP, {"boundary": BOUNDARY}, field="file",
                                  max_bytes=1 << 30)
    assert caught.value.param == "file"
    assert pulled <= LIMIT // KIB + 1


async def test_more_than_max_bytes_is_payload_too_large() -> None:
    data = body(part(FILE, bytes(10_000)))
    assert (await read([data], max_bytes=len(data)))[0] == bytes(10_000)
    error = await refusal([data[:5000], data[5000:]], max_bytes=len(data) - 1)
    assert type(error) is PayloadTooLarge
    assert str(error) == (f"request body must be at most {len(data) - 1} bytes "
                          "(STT_MAX_UPLOAD_BYTES)")
    head = part(FILE, b"").removesuffix(b"\r\n")
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:  # no Content-Length: refused as it streams
        nonlocal pulled
        yield head
        while True:
            pulled += 1
            yield bytes(KIB)

    with pytest.raises(PayloadTooLarge):
        await read_multipart_file(endless(), MP, {"boundary": BOUNDARY}, field="file",
                                  max_bytes=100 * KIB)
    assert pulled == (100 * KIB - len(head)) // KIB + 1


async def test_the_file_is_closed_whenever_reading_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[IO[bytes]] = []
    spooled = tempfile.SpooledTemporaryFile

    def recorded(*args: Any, **kwargs: Any) -> IO[bytes]:
        made.append(spooled(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", recorded)

    async def broken() -> AsyncIterator[bytes]:
        yield part(FILE, b"")
        yield bytes(9 * 1024 * KIB)  # on disk by now
        raise trio.TooSlowError

    with pytest.raises(trio.TooSlowError):
        await read_multipart_file(broken(), MP, {"boundary": BOUNDARY}, field="file",
                                  max_bytes=1 << 30)
    cut = 8 * 1024 * KIB + KIB  # on disk after the first piece
    for data, max_bytes in [(body(part(FILE, bytes(9 * 1024 * KIB))), 9 * 1024 * KIB),
                            (body(part(FILE, bytes(cut)), part(FILE, b"y")), 1 << 30),
                            (body(part(NOTE, b"x")), 1 << 30)]:
        await refusal([data[:cut], data[cut:]], max_bytes=max_bytes)
    assert len(made) == 4
    assert all(file.closed for file in made)
