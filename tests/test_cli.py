"""The ``sttd`` command as a real process: start-up errors and clean signal shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import trio

TIMEOUT_S = 60


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STT_")}
    env.update(extra)
    return env


async def test_bad_setting_stops_startup_naming_the_variable() -> None:
    with trio.fail_after(TIMEOUT_S):
        result = await trio.run_process(
            [sys.executable, "-m", "sttd.cli", "serve"], capture_stderr=True, check=False,
            env=_env(STT_PORT="eighty"))
    assert result.returncode == 2
    assert "STT_PORT must be a number" in result.stderr.decode()
    assert "'eighty'" in result.stderr.decode()


async def test_unknown_setting_stops_startup() -> None:
    with trio.fail_after(TIMEOUT_S):
        result = await trio.run_process(
            [sys.executable, "-m", "sttd.cli", "serve"], capture_stderr=True, check=False,
            env=_env(STT_PORTT="8000"))
    assert result.returncode == 2
    assert "unknown setting STT_PORTT" in result.stderr.decode()


@pytest.mark.parametrize("args", [[], ["--workers", "2"]], ids=["single", "workers"])
async def test_a_port_in_use_stops_startup_with_one_line(args: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(TIMEOUT_S):
            result = await trio.run_process(
                [sys.executable, "-m", "sttd.cli", "serve", *args], capture_stderr=True,
                check=False, env=_env(STT_BACKEND="mock", STT_HOST="127.0.0.1",
                                      STT_PORT=str(port)))
    said = [line for line in result.stderr.decode().splitlines() if line.startswith("sttd: ")]
    assert result.returncode == 2
    assert said == [f"sttd: cannot listen on STT_HOST=127.0.0.1 STT_PORT={port}: Address "
                    "already in use; expected a free port on an address of this host"]
    assert "Traceback" not in result.stderr.decode()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_stops_the_server_cleanly(signum: signal.Signals) -> None:
    env = _env(STT_BACKEND="mock", STT_HOST="127.0.0.1", STT_PORT="0", STT_LOG_FORMAT="json")
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(partial_process, env)
            assert process.stderr is not None
            lines = _Lines(process.stderr)
            port = int((await lines.wait_for('"event": "server.listening"')).split('"port": "')[1]
                       .split('"')[0])
            await lines.wait_for('"event": "engine.ready"')
            async with httpx.AsyncClient(timeout=10) as client:
                health = await client.get(f"http://127.0.0.1:{port}/health")
            assert health.status_code == 200
            process.send_signal(signum)
            await lines.wait_for('"event": "server.stopped"')
            code = await process.wait()
    assert code == 0
    assert "Traceback" not in lines.seen


async def partial_process(env: dict[str, str], *,
                          task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED
                          ) -> None:
    await trio.run_process([sys.executable, "-m", "sttd.cli", "serve"], env=env,
                           stderr=subprocess.PIPE, task_status=task_status, check=False)


class _Lines:
    """Reads a process's stderr line by line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.seen = ""

    async def wait_for(self, needle: str) -> str:
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if sep:
                self._buffer = rest
                text = line.decode()
                self.seen += text + "\n"
                if needle in text:
                    return text
                continue
            chunk = await self._stream.receive_some()
            if not chunk:
                raise AssertionError(f"stderr ended before {needle!r}; saw:\n{self.seen}")
            self._buffer += chunk

    async def read_to_end(self) -> str:
        """Everything until the stream ends (added to `seen`, as returned)."""
        rest = self._buffer
        self._buffer = b""
        while chunk := await self._stream.receive_some():
            rest += chunk
        self.seen += rest.decode()
        return rest.decode()


SERVER_ONLY = ("hypercorn", "quart", "quart_trio", "onnxruntime")


async def test_the_client_commands_do_not_import_the_server() -> None:
    probe = (
        "import sys\n"
        "import sttd.cli\n"
        "try:\n"
        "    sttd.cli.main(['stream', '--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "import sttd.client._cli  # what stream and transcribe run\n"
        f"print(sorted({{name.split('.')[0] for name in sys.modules}} & {set(SERVER_ONLY)!r}))\n")
    with trio.fail_after(TIMEOUT_S):
        result = await trio.run_process([sys.executable, "-c", probe], capture_stdout=True,
                                        capture_stderr=True, check=False, env=_env())
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.decode().splitlines()[-1] == "[]"
    assert result.stdout.decode().startswith("usage: sttd stream")


async def test_python_m_sttd_is_the_command() -> None:
    with trio.fail_after(TIMEOUT_S):
        result = await trio.run_process([sys.executable, "-m", "sttd", "--help"],
                                        capture_stdout=True, check=False, env=_env())
    assert result.returncode == 0
    assert result.stdout.decode().startswith("usage: sttd [-h] {serve,stream,transcribe}")
