"""``sttd stream`` and ``sttd transcribe`` as real processes against the server in this process."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import trio
from rich.console import Console

from sttd import client
from sttd.backends import Request
from sttd.audio import encode_wav, pcm16_to_float32
from tests.conftest import (
    REFERENCES,
    RunningServer,
    load_pcm,
    reference_texts,
    silence,
    start_server,
)
from tests.test_cli import _env

TIMEOUT_S = 60
NAMES = ["ps_goforward", "ps_cards_001", "ps_librivox_0880"]
SRT_BLOCK = re.compile(r"1\n\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}\n(.*)\n")


def _client_env(**extra: str) -> dict[str, str]:
    """The environment without the server's settings or the client's own defaults."""
    env = {k: v for k, v in _env().items() if k not in ("STTD_URL", "STTD_API_KEY")}
    env.update(extra)
    return env


async def _sttd(*args: str, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(TIMEOUT_S):
        return await trio.run_process(
            [sys.executable, "-m", "sttd.cli", *args], stdin=stdin, capture_stdout=True,
            capture_stderr=True, check=False, env=_client_env(**env))


def _speech(names: list[str]) -> np.ndarray:
    return np.concatenate([part for name in names for part in (load_pcm(name), silence(1.0))])


def _wav(path: Path, names: list[str]) -> Path:
    path.write_bytes(encode_wav(pcm16_to_float32(_speech(names))))
    return path


# stream -------------------------------------------------------------------------------------


async def test_stream_file_fast_prints_each_final(server: RunningServer, tmp_path: Path) -> None:
    refs = reference_texts()
    result = await _sttd("stream", str(_wav(tmp_path / "talk.wav", NAMES)), "--fast",
                         "--url", server.http_url)
    assert result.stderr.decode() == ""
    assert result.stdout.decode() == "".join(f"{refs[name]}\n" for name in NAMES)
    assert result.returncode == 0


async def test_stream_json_prints_the_finals_as_the_server_sent_them(
        server: RunningServer) -> None:
    result = await _sttd("stream", str(REFERENCES / "ps_cards_001.wav"), "--fast", "--json",
                         STTD_URL=server.ws_url())  # the URL from the environment, as ws://
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [(m["type"], m["text"]) for m in lines] == [("final", reference_texts()["ps_cards_001"])]
    assert {"utterance_id", "start_ms", "end_ms", "words", "backlog_ms"} <= set(lines[0])
    assert lines[0]["words"]  # --json shows the words, so the CLI asks for them
    assert result.returncode == 0


async def test_stream_without_json_asks_the_server_for_no_word_timings(
        server: RunningServer, mock_requests: list[Request]) -> None:
    mock_requests.clear()  # the engine's start-up measurement
    result = await _sttd("stream", str(REFERENCES / "ps_cards_001.wav"), "--fast",
                         "--url", server.http_url)
    assert result.stdout.decode() == reference_texts()["ps_cards_001"] + "\n"
    assert [r.word_timings for r in mock_requests if r.kind == "final"] == [False]


async def test_stream_stdin_sends_raw_pcm(server: RunningServer) -> None:
    refs = reference_texts()
    result = await _sttd("stream", "-", "--url", server.http_url,
                         stdin=_speech(NAMES[:2]).astype("<i2").tobytes())
    assert result.stdout.decode() == f"{refs[NAMES[0]]}\n{refs[NAMES[1]]}\n"
    assert result.returncode == 0


async def test_stream_refused_session_reports_the_error(server: RunningServer) -> None:
    result = await _sttd("stream", str(REFERENCES / "ps_cards_001.wav"), "--fast",
                         "--language", "fr", "--url", server.http_url)
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().startswith("sttd: unsupported_language: ")
    assert "'fr'" in result.stderr.decode()


async def test_stream_with_the_api_key_from_the_environment(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, api_keys="k-cli")
    wav = str(REFERENCES / "ps_cards_001.wav")
    refused = await _sttd("stream", wav, "--fast", "--url", server.http_url)
    allowed = await _sttd("stream", wav, "--fast", "--url", server.http_url, STTD_API_KEY="k-cli")
    assert (refused.returncode, allowed.returncode) == (1, 0)
    assert refused.stderr.decode().startswith("sttd: unauthorized: ")
    assert allowed.stdout.decode() == reference_texts()["ps_cards_001"] + "\n"


async def test_stream_missing_file_is_a_usage_error() -> None:
    result = await _sttd("stream", "no-such-file.wav", "--url", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert result.stderr.decode() == "sttd: no-such-file.wav: No such file or directory\n"


async def test_stream_unreachable_server_exits_1() -> None:
    result = await _sttd("stream", str(REFERENCES / "ps_cards_001.wav"),
                         "--url", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert result.stderr.decode().startswith("sttd: unreachable: ws://127.0.0.1:9/v1/stt/ws: ")


async def test_mic_without_sounddevice_exits_2_with_the_hint(tmp_path: Path) -> None:
    # Whether or not sounddevice is installed here, this path makes importing it fail.
    (tmp_path / "sounddevice.py").write_text("raise ImportError('no PortAudio here')\n")
    result = await _sttd("stream", "--mic", PYTHONPATH=str(tmp_path))
    assert result.returncode == 2
    assert "install the mic extra: uv sync --extra mic" in result.stderr.decode()
    assert result.stdout == b""


FAKE_SOUNDDEVICE = textwrap.dedent("""
    '''A stand-in for sounddevice: the "microphone" says what $FAKE_MIC_PCM holds, at once.'''
    import os, threading
    import numpy as np

    class InputStream:
        def __init__(self, *, samplerate, channels, dtype, blocksize, callback):
            assert (samplerate, channels, dtype) == (16000, 1, "int16")
            self._callback = callback

        def __enter__(self):
            pcm = np.fromfile(os.environ["FAKE_MIC_PCM"], "<i2").reshape(-1, 1)
            def run():
                for start in range(0, len(pcm), 8000):  # half-second blocks, PortAudio's thread
                    block = pcm[start:start + 8000]
                    self._callback(block, len(block), None, None)
            self._thread = threading.Thread(target=run)
            self._thread.start()
            return self

        def __exit__(self, *exc):
            self._thread.join()
""")


async def test_mic_streams_until_ctrl_c_then_prints_the_last_finals(
        server: RunningServer, tmp_path: Path) -> None:
    (tmp_path / "sounddevice.py").write_text(FAKE_SOUNDDEVICE)
    pcm = tmp_path / "mic.pcm"
    pcm.write_bytes(_speech(["ps_goforward"]).astype("<i2").tobytes())
    env = _client_env(PYTHONPATH=str(tmp_path), FAKE_MIC_PCM=str(pcm))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(partial_run_process, [
                sys.executable, "-m", "sttd.cli", "stream", "--mic", "--url", server.http_url],
                env)
            assert process.stdout is not None
            output = b""
            while b"\n" not in output:  # the final of what the microphone heard
                chunk = await process.stdout.receive_some()
                assert chunk, "stdout closed before a final"
                output += chunk
            process.send_signal(signal.SIGINT)  # how a microphone session ends
            while chunk := await process.stdout.receive_some():
                output += chunk
            code = await process.wait()
    assert output.decode() == reference_texts()["ps_goforward"] + "\n"
    assert code == 0


async def partial_run_process(argv: list[str], env: dict[str, str], *,
                              task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED
                              ) -> None:
    await trio.run_process(argv, env=env, stdout=subprocess.PIPE, stderr=None, check=False,
                           task_status=task_status)


# transcribe ---------------------------------------------------------------------------------


async def test_transcribe_writes_one_srt_per_file(server: RunningServer, tmp_path: Path) -> None:
    refs = reference_texts()
    a = _wav(tmp_path / "a.wav", ["ps_goforward"])
    b = _wav(tmp_path / "b.wav", ["ps_cards_001"])
    out = tmp_path / "subs"
    result = await _sttd("transcribe", str(a), str(b), "--format", "srt", "--out", str(out),
                         "--url", server.http_url)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert sorted(path.name for path in out.iterdir()) == ["a.srt", "b.srt"]
    for name, fixture in (("a.srt", "ps_goforward"), ("b.srt", "ps_cards_001")):
        match = SRT_BLOCK.fullmatch((out / name).read_text())
        assert match is not None, (out / name).read_text()
        assert match.group(1) == refs[fixture]


async def test_transcribe_one_file_prints_it(server: RunningServer) -> None:
    refs = reference_texts()
    text = await _sttd("transcribe", str(REFERENCES / "ps_librivox_0930.wav"),
                       "--url", server.http_url)
    as_json = await _sttd("transcribe", str(REFERENCES / "ps_librivox_0930.wav"),
                          "--format", "json", "--url", server.http_url)
    assert (text.returncode, text.stdout.decode()) == (0, refs["ps_librivox_0930"] + "\n")
    verbose = json.loads(as_json.stdout)
    assert as_json.stdout.endswith(b"}\n")  # a line, so the shell's prompt starts on its own
    assert verbose["text"] == refs["ps_librivox_0930"]
    assert [segment["text"] for segment in verbose["segments"]] == [refs["ps_librivox_0930"]]


async def test_transcribe_bad_file_is_named_and_exits_1(server: RunningServer,
                                                        tmp_path: Path) -> None:
    good = _wav(tmp_path / "good.wav", ["ps_cards_001"])
    bad = tmp_path / "bad.wav"
    bad.write_text("this is not audio\n" * 20)
    missing = tmp_path / "missing.wav"
    result = await _sttd("transcribe", str(bad), str(missing), str(good), "--format", "txt",
                         "--url", server.http_url)
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"sttd: {bad}: unsupported_media_type: ")
    assert lines[1] == f"sttd: {missing}: No such file or directory"
    # The other files still go through, each beside its input.
    assert good.with_suffix(".txt").read_text() == reference_texts()["ps_cards_001"] + "\n"
    assert not bad.with_suffix(".txt").exists()


async def test_transcribe_refuses_two_inputs_with_one_output(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    result = await _sttd("transcribe", str(tmp_path / "a.wav"), str(tmp_path / "x" / "a.wav"),
                         "--out", str(tmp_path / "out"), "--url", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "would both write" in result.stderr.decode()


async def test_stream_on_a_terminal_rewrites_the_partial_and_times_the_finals(
        server: RunningServer) -> None:
    ref = reference_texts()["ps_librivox_0880"]
    controller, terminal = pty.openpty()
    output = bytearray()

    async def read_terminal() -> None:
        async with trio.lowlevel.FdStream(controller) as stream:
            try:
                while chunk := await stream.receive_some():
                    output.extend(chunk)
            except trio.BrokenResourceError:  # EIO: nothing holds the terminal any more
                pass

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_terminal)
            try:
                result = await trio.run_process(
                    [sys.executable, "-m", "sttd.cli", "stream",
                     # Real-time pace: sent --fast, a loaded machine may decode no partial
                     # before the final (partials yield to finals), and the test would flake.
                     str(REFERENCES / "ps_librivox_0880.wav"), "--url", server.http_url],
                    stdout=terminal, capture_stderr=True, check=False,
                    env=_client_env(COLUMNS="200", TERM="xterm"))
            finally:
                os.close(terminal)
    assert (result.returncode, result.stderr) == (0, b"")
    screen = output.decode().replace("\r\n", "\n")  # the terminal turns \n into \r\n
    # Each partial rewrites the line (rich's carriage return and erase-line, then the line,
    # with no newline): stable words plain, the rest dim.
    partials = [_partial_frame(line) for line in
                re.findall(r"\r\x1b\[2K\[00:00\.\d\] ([^\r\n]*)(?=\r)", screen)]
    assert partials, screen
    for stable, unstable in partials:
        assert ref.startswith(stable + unstable), (stable, unstable)  # stable ends in a space
    assert any(unstable for _, unstable in partials), partials
    # The final replaces the partial, with its start time, and is all the terminal shows at
    # the end: a partial that was not rewritten in place would have left a row (or text) behind.
    assert re.search(r"\r\x1b\[2K\[00:00\.\d\] " + re.escape(ref) + "\n", screen), screen
    assert _screen(screen)[0].startswith("[00:00.")
    assert [row[10:] for row in _screen(screen)] == [ref], _screen(screen)


def _partial_frame(line: str) -> tuple[str, str]:
    """A partial's line as rich writes it: (plain words, dim words)."""
    stable, dim, rest = line.partition("\x1b[2m")
    unstable = rest.removesuffix("\x1b[0m")
    assert "\x1b" not in stable + unstable, repr(line)
    assert not dim or rest.endswith("\x1b[0m"), repr(line)
    return stable, unstable


def _screen(output: str) -> list[str]:
    """The rows a terminal shows after `output`, without styles or trailing blank rows.

    Knows what rich writes: text, CR, LF, erase line (ESC[2K), cursor up (ESC[nA); other
    sequences (styles, cursor visibility) change no text.
    """
    rows, row, column = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]", output):
        if token == "\r":
            column = 0
        elif token == "\n":
            row, column = row + 1, 0
            rows += [""] * (row + 1 - len(rows))
        elif token == "\x1b[2K":
            rows[row] = ""
        elif up := re.fullmatch(r"\x1b\[(\d*)A", token):
            row = max(row - int(up.group(1) or 1), 0)
        elif not token.startswith("\x1b"):
            line = rows[row].ljust(column)
            rows[row] = line[:column] + token + line[column + 1:]
            column += 1
    while rows and not rows[-1].strip():
        rows.pop()
    return [row.rstrip() for row in rows]


def _terminal(file: io.StringIO, width: int) -> Console:
    return Console(file=file, force_terminal=True, width=width, color_system="standard",
                   markup=False, highlight=False, emoji=False)


def test_live_display_rewrites_one_line_and_prints_finals_above_it() -> None:
    from sttd.client._cli import _Display

    out, err = io.StringIO(), io.StringIO()
    display = _Display(out, err, False, _terminal(out, 40))
    with display.shown():
        display.status("listening (Ctrl-C to stop)")
        assert _screen(out.getvalue()) == ["listening (Ctrl-C to stop)"]
        display.show(client.Partial(0, "", "go", 100, 500))
        display.show(client.Partial(0, "go", "forward", 100, 900))
        assert _screen(out.getvalue()) == ["[00:00.1] go forward"]
        assert out.getvalue().endswith("\r\x1b[2K[00:00.1] go \x1b[2mforward\x1b[0m")
        display.show(client.Warning("lagging", "the session lags"))
        assert err.getvalue() == "sttd: warning lagging: the session lags\n"
        assert _screen(out.getvalue()) == ["[00:00.1] go forward"]  # drawn again after it
        # A long partial keeps its newest words on one row: the start gives way.
        display.show(client.Partial(0, "go forward ten meters then turn", "left 字字", 100, 900))
        assert _screen(out.getvalue()) == ["[00:00.1] …n meters then turn left 字字"]
        display.show(client.Final(0, "go forward ten meters", 100, 2000))
        assert _screen(out.getvalue()) == ["[00:00.1] go forward ten meters",
                                           "listening (Ctrl-C to stop)"]
        display.show(client.Error("backend_failed", "it broke"))
        display.show(client.UtteranceEnd(2000))
    assert _screen(out.getvalue()) == ["[00:00.1] go forward ten meters"]
    assert err.getvalue().splitlines() == ["sttd: warning lagging: the session lags",
                                           "sttd: error backend_failed: it broke"]
    assert display.errors == 1


def test_piped_display_prints_only_the_finals_text_or_their_raw_json() -> None:
    from sttd.client._cli import _Display

    raw = '{"type":"final","utterance_id":0,"text":"go","start_ms":0,"end_ms":9,"extra":[1]}'
    messages = [client.Partial(0, "", "go", 0, 5), client.parse_message(raw),
                client.Final(1, "", 10, 20), client.Final(2, "on", 30, 40)]
    plain, as_json, err = io.StringIO(), io.StringIO(), io.StringIO()
    for out, json_lines in ((plain, False), (as_json, True)):
        display = _Display(out, err, json_lines, None)
        with display.shown():
            for message in messages:
                assert not isinstance(message, client.Ready)
                display.show(message)
    assert plain.getvalue() == "go\non\n"
    assert [json.loads(line) for line in as_json.getvalue().splitlines()] == [
        json.loads(raw),  # as it came, with what this client does not know
        {"type": "final", "utterance_id": 1, "text": "", "start_ms": 10, "end_ms": 20,
         "words": [], "confidence": None, "language": None,
         "language_probability": None, "backlog_ms": None},
        {"type": "final", "utterance_id": 2, "text": "on", "start_ms": 30, "end_ms": 40,
         "words": [], "confidence": None, "language": None,
         "language_probability": None, "backlog_ms": None}]
    assert err.getvalue() == ""


def test_progress_shows_the_upload_of_one_file_and_the_count_of_many() -> None:
    from sttd.client._cli import _upload_progress, _Uploads

    one = io.StringIO()
    progress = _upload_progress(_terminal(one, 100), auto_refresh=False, get_time=lambda: 0.0)
    uploads = _Uploads(one, progress, 1)
    with uploads.shown():
        uploads.start("talk.wav")
        uploads.uploaded(3 * 2**20, 4 * 2**20)
        assert [(t.description, t.completed, t.total, t.fields["state"])
                for t in progress.tasks] == [
            ("talk.wav", 3 * 2**20, 4 * 2**20, "uploading 3.0 of 4.0 MiB")]
        progress.refresh()
        [row] = _screen(one.getvalue())
        assert row.startswith("talk.wav ") and " 75% uploading 3.0 of 4.0 MiB 0:00:00" in row
        uploads.uploaded(4 * 2**20, 4 * 2**20)  # the server transcribes: no total, a clock
        assert [(t.completed, t.total, t.fields["state"]) for t in progress.tasks] == [
            (0, None, "transcribing")]
        progress.refresh()
        [row] = _screen(one.getvalue())
        assert row.startswith("talk.wav ") and row.endswith(" transcribing 0:00:00")
        uploads.notice("wrote talk.txt", only_on_terminal=True)
        uploads.finish_file()
    assert _screen(one.getvalue()) == ["wrote talk.txt"]  # the bar is gone, the notice stays

    many = io.StringIO()
    progress = _upload_progress(_terminal(many, 100), auto_refresh=False, get_time=lambda: 0.0)
    uploads = _Uploads(many, progress, 4)
    with uploads.shown():
        uploads.start("a.wav")
        uploads.uploaded(10, 10)
        uploads.finish_file()
        uploads.start("b.wav")
        uploads.notice("sttd: b.wav: bad_audio: broken")
        assert [(t.description, t.completed, t.total, t.fields["state"])
                for t in progress.tasks] == [("files", 1, 4, "1/4"), ("b.wav", 0, None, "")]
        progress.refresh()
        notice, files, upload = _screen(many.getvalue())
        assert notice == "sttd: b.wav: bad_audio: broken"
        assert files.startswith("files ") and " 25% 1/4 " in files
        assert upload.startswith("b.wav ")
    assert _screen(many.getvalue()) == ["sttd: b.wav: bad_audio: broken"]

    quiet = io.StringIO()  # stderr is not a terminal: only notices
    uploads = _Uploads(quiet, None, 2)
    with uploads.shown():
        uploads.start("a.wav")
        uploads.uploaded(5, 10)
        uploads.notice("wrote a.txt", only_on_terminal=True)
        uploads.notice("sttd: b.wav: failed")
        uploads.finish_file()
    assert quiet.getvalue() == "sttd: b.wav: failed\n"


def test_stream_times_read_as_a_clock() -> None:
    from sttd.client._cli import _clock

    assert [_clock(ms) for ms in (0, 1250, 61999, 3_600_000 + 62_300)] == [
        "00:00.0", "00:01.2", "01:01.9", "1:01:02.3"]


async def test_mic_that_cannot_open_is_reported(server: RunningServer, tmp_path: Path) -> None:
    (tmp_path / "sounddevice.py").write_text(textwrap.dedent("""
        class PortAudioError(Exception):
            pass

        class InputStream:
            def __init__(self, **options):
                raise PortAudioError("Error querying device -1")
    """))
    result = await _sttd("stream", "--mic", "--url", server.http_url, PYTHONPATH=str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.decode() == "sttd: cannot open the microphone: Error querying device -1\n"


async def test_a_url_without_a_scheme_is_a_usage_error_not_a_traceback() -> None:
    for command in (["stream", "x.wav"], ["transcribe", "x.wav"]):
        result = await trio.run_process(
            [sys.executable, "-m", "sttd.cli", *command, "--url", "127.0.0.1:8000"],
            capture_stdout=True, capture_stderr=True, check=False, env=_client_env())
        assert result.returncode == 2
        assert b"--url" in result.stderr and b"Traceback" not in result.stderr
