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
    assert result.returncode == 0


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
                    env=_client_env(COLUMNS="200"))
            finally:
                os.close(terminal)
    assert (result.returncode, result.stderr) == (0, b"")
    screen = output.decode().replace("\r\n", "\n")  # the terminal turns \n into \r\n
    # Each partial rewrites the line: stable words plain, the rest dim.
    partials = re.findall(r"\r\x1b\[2K\[00:00\.\d\] ([^\r\n]*)\x1b\[0m", screen)
    assert partials, screen
    for line in partials:
        stable, _, unstable = line.partition("\x1b[2m")
        assert ref.startswith(stable + unstable), line  # the space between is part of stable
    # The final replaces the partial, with its start time; nothing is left on the line after it.
    assert re.search(r"\r\x1b\[2K\[00:00\.\d\] " + ref + "\n$", screen), screen


def test_progress_line_shows_the_upload_of_one_file_and_the_count_of_many() -> None:
    from sttd.cli import _Progress

    one = io.StringIO()
    progress = _Progress(one, enabled=True, files=1)
    progress.start("talk.wav")
    progress.uploaded(3 * 2**20, 4 * 2**20)  # within the redraw period of start: not drawn
    progress.uploaded(4 * 2**20, 4 * 2**20)  # the upload's end is always drawn
    progress.clear()
    assert one.getvalue().split("\r\x1b[2K") == [
        "", "talk.wav [------------------------] ",
        "talk.wav [########################] transcribing", ""]

    many = io.StringIO()
    progress = _Progress(many, enabled=True, files=4)
    progress.start("a.wav")
    progress.finish_file()
    progress.start("b.wav")
    progress.notice("sttd: b.wav: bad_audio: broken")
    assert many.getvalue().split("\r\x1b[2K") == [
        "", "[------------------------] 0/4 files  a.wav ",
        "[######------------------] 1/4 files  a.wav ",
        "[######------------------] 1/4 files  b.wav ", "sttd: b.wav: bad_audio: broken\n"]

    quiet = io.StringIO()  # stderr is not a terminal: only notices
    progress = _Progress(quiet, enabled=False, files=2)
    progress.start("a.wav")
    progress.notice("wrote a.txt", only_on_terminal=True)
    progress.notice("sttd: b.wav: failed")
    assert quiet.getvalue() == "sttd: b.wav: failed\n"


def test_stream_times_read_as_a_clock() -> None:
    from sttd.cli import _clock

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
