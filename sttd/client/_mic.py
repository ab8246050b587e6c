"""Microphone capture for ``sttd stream --mic``: PortAudio (through ``sounddevice``) into a
session.

``sounddevice`` comes with the ``mic`` extra; `load_sounddevice` imports it, or says how to get
it. PortAudio calls back on its own thread with each block; the block is handed to trio without
blocking that thread, through a bounded channel, so a slow network drops blocks (and says so)
instead of queueing them without bound.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

import trio

from sttd.audio import SAMPLE_RATE_HZ
from sttd.client._session import StreamingSession
from sttd.errors import SttdError

__all__ = ["MIC_HINT", "MicrophoneUnavailable", "load_sounddevice", "send_microphone"]

MIC_HINT: Final = "install the mic extra: uv sync --extra mic"
BLOCK_MS: Final = 20
# Blocks waiting for the network (5 s); past that new blocks are dropped.
_QUEUE_BLOCKS: Final = 250
_DROP_REPORT_EVERY: Final = 50  # blocks dropped between two reports


class MicrophoneUnavailable(SttdError):
    """There is no microphone support (``sounddevice`` or PortAudio), or the device refused."""


def load_sounddevice() -> ModuleType:
    """The ``sounddevice`` module; raises `MicrophoneUnavailable` (with `MIC_HINT`) without it."""
    try:
        return importlib.import_module("sounddevice")
    except (ImportError, OSError) as exc:  # OSError: sounddevice is there, PortAudio is not
        raise MicrophoneUnavailable(f"--mic needs sounddevice ({exc}); {MIC_HINT}") from None


async def send_microphone(session: StreamingSession, *, sounddevice: ModuleType,
                          notice: Callable[[str], None]) -> None:
    """Send the default input device's audio (16 kHz mono int16) until cancelled.

    `notice` is called (in trio) when blocks are dropped. Raises `MicrophoneUnavailable` if the
    device cannot be opened (none, or it refuses 16 kHz mono).
    """
    send_block, receive_block = trio.open_memory_channel[bytes](_QUEUE_BLOCKS)
    token = trio.lowlevel.current_trio_token()
    dropped = 0

    def push(block: bytes) -> None:  # in trio
        nonlocal dropped
        try:
            send_block.send_nowait(block)
        except trio.WouldBlock:
            dropped += 1
            if dropped % _DROP_REPORT_EVERY == 1:
                notice(f"sttd: the network is slower than the microphone: dropped {dropped} "
                       f"blocks of {BLOCK_MS} ms so far")
        except trio.ClosedResourceError:
            pass  # a block that came after we stopped

    def callback(indata: Any, frames: int, time_info: Any, status: Any) -> None:  # PortAudio's
        try:
            token.run_sync_soon(push, bytes(indata))
        except trio.RunFinishedError:
            pass

    with send_block, receive_block:
        try:
            microphone = sounddevice.InputStream(
                samplerate=SAMPLE_RATE_HZ, channels=1, dtype="int16",
                blocksize=SAMPLE_RATE_HZ * BLOCK_MS // 1000, callback=callback)
        except sounddevice.PortAudioError as exc:
            raise MicrophoneUnavailable(f"cannot open the microphone: {exc}") from None
        with microphone:
            async for block in receive_block:
                await session.send_audio(block)
