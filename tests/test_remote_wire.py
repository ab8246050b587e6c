"""Scale-out on loopback: an sttd front door on the remote backend, two upstream sttd processes
(mock backend) behind it, and one upstream killed in the middle of a live stream."""

from __future__ import annotations

import json
import signal
from typing import Any

import attrs
import httpx
import numpy as np
import trio
from trio_websocket import open_websocket_url

from sttd.backends.remote import RemoteBackend
from tests.conftest import (
    load_pcm,
    receive_type,
    receive_until_close,
    reference_texts,
    send_pcm,
    silence,
    start_server,
)
from tests.test_cli import _env, _Lines, partial_process

TIMEOUT_S = 90
NAMES = ("ps_librivox_0880", "ps_cards_001", "ps_librivox_0930", "ps_goforward")


@attrs.frozen
class Upstream:
    process: trio.Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


async def _upstream(nursery: trio.Nursery) -> Upstream:
    env = _env(STT_BACKEND="mock", STT_HOST="127.0.0.1", STT_PORT="0", STT_LOG_FORMAT="json",
               STT_VAD="energy")
    process = await nursery.start(partial_process, env)
    assert process.stderr is not None
    lines = _Lines(process.stderr)
    port = int((await lines.wait_for('"event": "server.listening"')).split('"port": "')[1]
               .split('"')[0])
    await lines.wait_for('"event": "engine.ready"')

    async def drain() -> None:  # a full pipe would stall the upstream's logging
        assert process.stderr is not None
        while await process.stderr.receive_some():
            pass

    nursery.start_soon(drain)
    return Upstream(process, port)


async def _transcriptions_served(upstream: Upstream) -> float:
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"http://127.0.0.1:{upstream.port}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sttd_http_requests_total{")
               and 'route="/v1/audio/transcriptions"' in line and 'status="200"' in line)


async def test_a_live_stream_loses_no_final_when_an_upstream_dies() -> None:
    refs = reference_texts()
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            upstreams = [await _upstream(nursery), await _upstream(nursery)]
            front = await start_server(
                nursery, backend="remote", vad="energy", inference_lanes=4,
                remote_urls=",".join(u.url for u in upstreams), remote_timeout_s=5.0,
                remote_eject_s=30.0)
            assert front.state.engine is not None
            backend = front.state.engine.backend
            assert isinstance(backend, RemoteBackend)
            finals: list[dict[str, Any]] = []
            async with open_websocket_url(front.ws_url()) as ws:
                await receive_type(ws, "ready")
                for index, name in enumerate(NAMES):
                    pcm = np.concatenate([load_pcm(name), silence(1.0)])
                    if index == 2:
                        # Both upstreams have worked; now one dies with this utterance open.
                        assert all([await _transcriptions_served(u) > 0 for u in upstreams])
                        await send_pcm(ws, pcm[: pcm.size // 2])
                        upstreams[0].process.send_signal(signal.SIGKILL)
                        await send_pcm(ws, pcm[pcm.size // 2:])
                    else:
                        await send_pcm(ws, pcm)
                    finals.append(await receive_type(ws, "final"))
                await ws.send_message(json.dumps({"type": "end"}))
                rest, code = await receive_until_close(ws)
            assert await upstreams[0].process.wait() == -signal.SIGKILL
            served_by_survivor = await _transcriptions_served(upstreams[1])
            upstreams[1].process.terminate()
            nursery.cancel_scope.cancel()
    assert [f["text"] for f in finals] == [refs[name] for name in NAMES]
    assert [m for m in rest if m["type"] in ("final", "error")] == []
    assert code == 1000
    dead = next(u for u in backend.pool.upstreams if u.url == upstreams[0].url)
    assert dead.failures >= 1  # it was tried after it died, and left out
    assert served_by_survivor >= 2


async def test_the_front_door_serves_files_through_the_upstream(nursery: trio.Nursery) -> None:
    """The OpenAI API of the front, over the remote backend, over an upstream's OpenAI API."""
    import openai

    from sttd.audio import encode_wav, pcm16_to_float32

    refs = reference_texts()
    upstream = await _upstream(nursery)
    front = await start_server(nursery, backend="remote", vad="energy", remote_urls=upstream.url)
    audio = np.concatenate([silence(0.3), load_pcm("ps_cards_001"), silence(1.0),
                            load_pcm("ps_goforward"), silence(0.3)])
    client = openai.OpenAI(base_url=f"{front.http_url}/v1", api_key="x", max_retries=0)
    result = await trio.to_thread.run_sync(lambda: client.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", encode_wav(pcm16_to_float32(audio))),
        response_format="verbose_json", timestamp_granularities=["word"]))
    upstream.process.terminate()
    assert result.text == f"{refs['ps_cards_001']} {refs['ps_goforward']}"
    assert [w.word for w in result.words] == result.text.split()
    # The upstream's word times, shifted to the front's file times: in order, in the file.
    assert 0.3 <= result.words[0].start and result.words[-1].end <= audio.size / 16000
    assert all(a.end <= b.start + 1e-6 for a, b in zip(result.words, result.words[1:]))
