"""``sttd serve --workers 2`` as a real multi-process server on one loopback port: sessions land
on every worker, /metrics and /health count all of them, and SIGTERM drains every worker. The
supervisor stops on a signal that comes while it restarts a worker, restarts a worker that
crashed once ready, gets a terminal's Ctrl-C alone, and takes its workers with it when killed."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from sttd.settings import Settings
from sttd.server._workers import worker_settings_env
from tests.conftest import load_pcm, reference_texts, send_pcm, silence
from tests.test_cli import _env, _Lines

TIMEOUT_S = 60
STOP_TIMEOUT_S = 20  # from a stop signal (or a killed supervisor) to every process gone
MAX_SESSIONS = 40  # opened until both workers have some: 2**-39 that the kernel gives one all


async def _served(nursery: trio.Nursery, *args: str, **env: str) -> tuple[trio.Process, _Lines, int]:
    full = _env(STT_BACKEND="mock", STT_VAD="energy", STT_HOST="127.0.0.1", STT_PORT="0",
                STT_LOG_FORMAT="json", **env)
    # In a session of its own, as under a terminal: its process group can be sent a Ctrl-C.
    process: trio.Process = await nursery.start(lambda task_status: trio.run_process(
        [sys.executable, "-m", "sttd.cli", "serve", *args], env=full, stderr=-1,
        check=False, start_new_session=True, task_status=task_status))
    assert process.stderr is not None
    lines = _Lines(process.stderr)
    port = int(json.loads(await lines.wait_for('"event": "workers.listening"'))["port"])
    return process, lines, port


async def _ready_workers(lines: _Lines, count: int) -> dict[int, int]:
    """Worker index -> pid, once `count` workers have logged engine.ready."""
    pids: dict[int, int] = {}
    for _ in range(count):
        started = json.loads(await lines.wait_for('"event": "workers.started"'))
        pids[int(started["worker"])] = int(started["pid"])
    for _ in range(count):
        await lines.wait_for('"event": "engine.ready"')
    return pids


def _events(text: str, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of `event` in `text`."""
    return [json.loads(line) for line in text.splitlines() if f'"event": "{event}"' in line]


def _worker_of(logged: str) -> int:
    """Which worker logged the JSON line `logged`."""
    return int(json.loads(logged)["worker"])


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name}


async def test_two_workers_share_the_port_the_metrics_and_the_drain() -> None:
    refs = reference_texts()
    speech = np.concatenate([load_pcm("ps_goforward"), silence(1.0)])
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            process, lines, port = await _served(nursery, "--workers", "2", STT_DRAIN_S="20")
            for _ in range(2):
                await lines.wait_for('"event": "engine.ready"')
            url = f"ws://127.0.0.1:{port}/v1/stt/ws?sample_rate=16000&call_id="
            sockets: list[WebSocketConnection] = []
            workers: set[int] = set()
            async with trio.open_nursery() as clients:
                while len(workers) < 2 and len(sockets) < MAX_SESSIONS:
                    ws = await clients.start(_open, url + f"c{len(sockets)}")
                    sockets.append(ws)
                    opened = await lines.wait_for('"event": "session.opened"')
                    workers.add(_worker_of(opened))
                assert workers == {0, 1}
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    health = (await http.get("/health")).json()
                    # Each open session has its final before the drain.
                    for ws in sockets:
                        await send_pcm(ws, speech)
                    finals = [await _next(ws, "final") for ws in sockets]
                    # A worker counts a final once its send has returned, which may be just
                    # after the client has it: scrape until both workers' counts are in.
                    while True:
                        metrics = (await http.get("/metrics")).text
                        if sum(_samples(metrics, "sttd_finals_sent_total").values()) >= len(
                                sockets):
                            break
                        await trio.sleep(0.05)
                # One SIGTERM to the supervisor drains every worker: each session still open
                # is closed with 1001, and the supervisor exits 0 once both workers have.
                process.send_signal(signal.SIGTERM)
                codes = [await _close_code(ws) for ws in sockets]
                clients.cancel_scope.cancel()
            code = await process.wait()
            assert code == 0, lines.seen
    assert health["status"] == "ok" and health["workers"]["count"] == 2
    assert health["workers"]["sessions"] == len(sockets)  # both workers' sessions, one answer
    assert health["workers"]["all_ready"] is True
    assert [final["text"] for final in finals] == [refs["ps_goforward"]] * len(sockets)
    assert set(codes) == {1001}
    # Either worker's scrape counts both workers' finals.
    assert sum(_samples(metrics, "sttd_finals_sent_total").values()) == len(sockets)
    assert sum(_samples(metrics, "sttd_sessions_active").values()) == len(sockets)


async def _open(url: str, *, task_status: trio.TaskStatus[WebSocketConnection]) -> None:
    async with open_websocket_url(url) as ws:
        await ws.get_message()  # ready
        task_status.started(ws)
        await trio.sleep_forever()


async def _next(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    while True:
        message = json.loads(await ws.get_message())
        if message["type"] == kind:
            return message  # type: ignore[no-any-return]


async def _close_code(ws: WebSocketConnection) -> int:
    while True:
        try:
            await ws.get_message()
        except ConnectionClosed as closed:
            return closed.reason.code


def test_workers_split_the_session_cap_and_the_cores() -> None:
    settings = Settings(backend="whisper", max_sessions=100, workers="2")
    env = worker_settings_env(settings, {"STT_BACKEND": "whisper"}, 2, 8000, cores=8)
    assert (env["STT_PORT"], env["STT_WORKERS"], env["STT_MAX_SESSIONS"]) == ("8000", "1", "50")
    assert (env["STT_INFERENCE_LANES"], env["STT_WHISPER_CPU_THREADS"]) == ("4", "1")
    # What the user set stays; a remote engine is shared by every worker, so no split.
    mine = worker_settings_env(Settings(backend="remote", inference_lanes=3, max_sessions=5),
                               {}, 2, 8000, cores=8)
    assert mine["STT_MAX_SESSIONS"] == "3" and "STT_INFERENCE_LANES" not in mine


def test_a_bad_worker_count_is_refused() -> None:
    import pytest

    from sttd.errors import ConfigError

    for bad in ("0", "-1", "two"):
        with pytest.raises(ConfigError, match="STT_WORKERS"):
            Settings.from_env({"STT_WORKERS": bad})
    assert Settings.from_env({"STT_WORKERS": "auto"}).workers == "auto"


async def test_a_stop_signal_while_a_worker_is_restarted_stops_everything() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            process, lines, _port = await _served(nursery, "--workers", "2")
            pids = await _ready_workers(lines, 2)
            os.kill(pids[0], signal.SIGKILL)
            await lines.wait_for('"event": "workers.restarting"')
            # In the pause before the restart. SIGHUP: the terminal was closed.
            process.send_signal(signal.SIGHUP)
            with trio.fail_after(STOP_TIMEOUT_S):
                code = await process.wait()
                after = await lines.read_to_end()  # once every worker is gone too
    # No worker is started once stopping, the live one drained, and a crash that was followed
    # by a restart does not make the clean stop a failure.
    assert code == 0, lines.seen
    assert _events(after, "workers.started") == []
    assert [e["cause"] for e in _events(after, "workers.stopping")] == ["SIGHUP"]
    assert [(e["worker"], e["code"]) for e in _events(after, "workers.exited")] == [("1", "0")]


async def test_a_worker_that_crashes_once_ready_is_restarted_and_ctrl_c_stops_each_once(
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            process, lines, port = await _served(nursery, "--workers", "2")
            pids = await _ready_workers(lines, 2)
            # Well within the first seconds of the server: it was ready, so it is restarted.
            os.kill(pids[1], signal.SIGKILL)
            await lines.wait_for('"event": "workers.exited"')
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                # Answered by the live worker, during the restart pause: not all are ready.
                while_down = (await http.get("/health")).json()["workers"]
                restarted = json.loads(await lines.wait_for('"event": "workers.started"'))
                await lines.wait_for('"event": "engine.ready"')
                after = (await http.get("/health")).json()["workers"]
            # A terminal's Ctrl-C goes to its whole foreground process group.
            os.killpg(process.pid, signal.SIGINT)
            with trio.fail_after(STOP_TIMEOUT_S):
                code = await process.wait()
                await lines.read_to_end()
    assert restarted["worker"] == "1"
    assert (while_down["count"], while_down["all_ready"]) == (2, False)
    assert after["all_ready"] is True
    assert "workers.failed_to_start" not in lines.seen
    assert code == 0, lines.seen
    # Each worker got one signal, the supervisor's SIGTERM, and none from the terminal.
    stops = _events(lines.seen, "server.stopping")
    assert sorted((e["worker"], e["signal"]) for e in stops) == [(0, "SIGTERM"), (1, "SIGTERM")]
    assert len(_events(lines.seen, "server.drained")) == 2


async def test_the_workers_drain_and_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            # TMPDIR: where the killed supervisor leaves its metrics directory.
            process, lines, _port = await _served(nursery, "--workers", "2", TMPDIR=str(tmp_path))
            await _ready_workers(lines, 2)
            process.kill()
            with trio.fail_after(STOP_TIMEOUT_S):
                await process.wait()
                # The workers hold the supervisor's stderr: it ends once both have exited.
                await lines.read_to_end()
    assert len(_events(lines.seen, "server.drained")) == 2
    assert len(_events(lines.seen, "server.stopped")) == 2


def test_a_second_stop_signal_kills_the_workers_still_stopping(tmp_path: Path) -> None:
    """A worker hung where its drain cannot reach ignores the SIGTERM it was sent: the second
    stop kills it, as a second Ctrl-C stops a single server at once."""
    import subprocess

    from sttd.server._workers import _Supervisor, _Worker

    hung = subprocess.Popen(
        [sys.executable, "-c", "import signal\n"
         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
         "print('ready', flush=True)\nsignal.pause()"], stdout=subprocess.PIPE)
    assert hung.stdout is not None and hung.stdout.readline() == b"ready\n"
    read_fd, write_fd = os.pipe()
    os.close(write_fd)
    supervisor = _Supervisor(count=1, env={}, metrics_dir=str(tmp_path), wakeup_fd=-1,
                             in_child=lambda: None)
    supervisor._workers[hung.pid] = _Worker(0, hung, read_fd, initial=True)
    try:
        supervisor._stop("SIGTERM")
        assert hung.poll() is None  # ignored, as a hung worker would
        supervisor._stop("SIGINT")
        assert hung.wait(timeout=10) == -signal.SIGKILL
    finally:
        hung.kill()
        hung.wait()
        os.close(read_fd)
