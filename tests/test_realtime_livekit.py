"""A voice-agent framework's OpenAI STT plugin against sttd, unchanged: LiveKit Agents'
``livekit-plugins-openai`` with ``use_realtime=True`` streams to ``/v1/realtime`` and gets
sttd's transcripts as its interim and final transcripts.

LiveKit's plugins run on asyncio, so the plugin runs in its own event loop in a worker thread
against the real server on loopback.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import trio

from tests.conftest import RunningServer, load_pcm, reference_texts, silence, start_server
from tests.test_realtime import pcm24

NAMES = ("ps_cards_001", "ps_goforward", "ps_librivox_0930")


async def _transcribe_with_livekit(server: RunningServer, names: tuple[str, ...]
                                   ) -> list[tuple[str, str]]:
    """The plugin's speech events (type, text) for `names` streamed in 100 ms frames."""
    import aiohttp
    from livekit import rtc
    from livekit.agents import stt as agents_stt
    from livekit.plugins import openai as lk_openai

    audio = np.frombuffer(b"".join(pcm24(np.concatenate([load_pcm(name), silence(1.5)]))
                                   for name in names), np.int16)
    seen: list[tuple[str, str]] = []

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            plugin = lk_openai.STT(base_url=f"{server.http_url}/v1", api_key="x",
                                   use_realtime=True, model="gpt-4o-transcribe",
                                   language="en", prompt="clubs")
            plugin._session = http  # outside a LiveKit job, the plugin needs its HTTP session
            stream = plugin.stream()
            for start in range(0, audio.size, 2400):
                chunk = audio[start : start + 2400]
                stream.push_frame(rtc.AudioFrame(chunk.tobytes(), 24000, 1, chunk.size))
            finals = 0
            async for event in stream:
                text = event.alternatives[0].text if event.alternatives else ""
                seen.append((event.type.name, text))
                if event.type == agents_stt.SpeechEventType.FINAL_TRANSCRIPT:
                    finals += 1
                    if finals == len(names):
                        break
            await stream.aclose()
            await plugin.aclose()

    def in_its_loop() -> None:
        asyncio.run(asyncio.wait_for(run(), 45))

    with trio.fail_after(60):
        await trio.to_thread.run_sync(in_its_loop, abandon_on_cancel=True)
    return seen


async def test_livekit_agents_openai_stt_plugin_gets_the_transcripts(
        nursery: trio.Nursery) -> None:
    refs = reference_texts()
    server = await start_server(nursery, vad="energy")
    events: list[Any] = await _transcribe_with_livekit(server, NAMES)
    finals = [text for kind, text in events if kind == "FINAL_TRANSCRIPT"]
    assert finals == [refs[name] for name in NAMES]
    kinds = [kind for kind, _ in events]
    # sttd's speech_started / speech_stopped became the framework's turn events.
    assert kinds.count("START_OF_SPEECH") >= len(NAMES) - 1
    assert kinds.count("END_OF_SPEECH") >= len(NAMES) - 1
