"""Stream audio to a WhisperLive server and collect what comes back, like sttd's `stream_file`.

This talks WhisperLive's WebSocket protocol (whisper-live 0.10.0, faster_whisper backend) over
loopback; no WhisperLive code is imported or kept here. The protocol, as its server implements it:

* client -> server, first message (text): JSON options, among them ``uid``, ``language``,
  ``task``, ``model`` (ignored when the server was started with a custom model path), ``use_vad``,
  ``send_last_n_segments``, ``no_speech_thresh``, ``clip_audio``, ``same_output_threshold`` and
  ``audio_format`` (``float32``, the default, ``int16`` or ``uint8``).
* server -> client: ``{"uid", "message": "SERVER_READY", "backend": "faster_whisper"}`` once the
  session's model is loaded; or ``{"uid", "status": "WAIT" | "ERROR" | "WARNING", "message"}``.
* client -> server: binary frames of mono 16 kHz samples in that format, any length.
* server -> client, after each decode: ``{"uid", "segments": [...]}`` with the last
  ``send_last_n_segments`` completed segments again, then the current incomplete one. A segment
  is ``{"start": "1.234", "end": "2.345", "text": " ...", "completed": bool}`` (seconds of stream
  time, as strings). A segment is completed when a later segment follows it in a decode, or when
  the trailing segment comes out the same in ``same_output_threshold`` + 2 decodes in a row.
* client -> server: the binary frame ``b"END_OF_AUDIO"`` ends the stream. The server then stops
  decoding and closes at once (code 1000): audio not yet committed is not flushed. So this client
  first waits, bounded, for the server to commit the tail (it keeps re-decoding it while at least
  1 s of uncommitted audio is buffered), as WhisperLive's own client does before it sends
  END_OF_AUDIO (until no text changed for 15 s); a partial still pending after that is kept as a
  final marked ``"flushed": True`` (WhisperLive's client writes it to its transcript too), with no
  latency.

Run as a script for a smoke test (from the repo root, in sttd's environment)::

    uv run --group bench python -m benchmarks.peers.whisperlive_client --url ws://127.0.0.1:9090 \
        ps_goforward.wav ps_librivox_0880.wav
"""

from __future__ import annotations

import argparse
import json
import uuid
from typing import Any

import numpy as np
import trio

from benchmarks._common import RATE_HZ, StreamOutcome

# Longest wait for SERVER_READY (the server loads its model when the first session connects).
READY_TIMEOUT_S = 60.0
# After the last audio frame: stop waiting once nothing is pending and nothing changed for
# QUIET_S, or once no text changed for DRAIN_TIMEOUT_S (WhisperLive's own client waits until
# the newest segment's text has not changed for 15 s), and in any case MAX_DRAIN_S after it.
QUIET_S = 1.0
DRAIN_TIMEOUT_S = 15.0
MAX_DRAIN_S = 60.0
# Longest wait for the server to close after END_OF_AUDIO.
CLOSE_TIMEOUT_S = 5.0
END_OF_AUDIO = b"END_OF_AUDIO"


def session_options(uid: str) -> dict[str, Any]:
    """The first message: WhisperLive's own client's defaults, English, VAD on, float32 audio."""
    return {
        "uid": uid,
        "language": "en",
        "task": "transcribe",
        "model": "tiny.en",  # the server's custom model path overrides this
        "use_vad": True,
        "send_last_n_segments": 10,
        "no_speech_thresh": 0.45,
        "clip_audio": False,
        "same_output_threshold": 10,
        "audio_format": "float32",
    }


async def stream_whisperlive(url: str, audio: np.ndarray, *, realtime: bool = True,
                             frame_ms: int = 20) -> StreamOutcome:
    """Stream float32 16 kHz `audio` over one WhisperLive session and collect what comes back.

    Finals are WhisperLive's completed segments, each once (it re-sends the recent ones with every
    update), as dicts with ``text``, ``start_ms`` and ``end_ms`` (plus ``flushed``). Partials
    count updates whose incomplete trailing segment has a new text (sttd sends a partial only when
    its text changed; WhisperLive re-sends unchanged ones after every decode). A final's latency
    is the time from sending the frame holding the audio at its ``end_ms`` to its first arrival.
    """
    from trio_websocket import ConnectionClosed, open_websocket_url

    samples = np.asarray(audio, dtype="<f4")
    frame_samples = RATE_HZ * frame_ms // 1000
    audio_ms = len(samples) * 1000 // RATE_HZ
    uid = uuid.uuid4().hex
    sent_at: list[float] = []  # send time of each frame
    finals: list[dict[str, Any]] = []
    latencies: list[float] = []
    seen: set[tuple[int, int, str]] = set()
    partials = 0
    code = 0
    pending = ""  # text of the incomplete trailing segment in the newest update
    pending_span = (0, 0)
    last_change = trio.current_time()
    ready = trio.Event()
    failure: list[str] = []

    def on_segments(segments: list[dict[str, Any]], now: float) -> None:
        nonlocal partials, pending, pending_span, last_change
        new_pending = ""
        for index, segment in enumerate(segments):
            text = str(segment.get("text", "")).strip()
            start_ms = round(float(segment["start"]) * 1000)
            end_ms = round(float(segment["end"]) * 1000)
            if segment.get("completed"):
                key = (start_ms, end_ms, text)
                if key in seen:
                    continue
                seen.add(key)
                last_change = now
                if not text:
                    continue
                finals.append({"type": "final", "text": text, "start_ms": start_ms,
                               "end_ms": end_ms, "flushed": False, "received_s": now})
                frame = end_ms // frame_ms
                if end_ms <= audio_ms:
                    frame = min(frame, len(sent_at) - 1)
                if 0 <= frame < len(sent_at):
                    latencies.append(now - sent_at[frame])
            elif index == len(segments) - 1:
                new_pending = text
                pending_span = (start_ms, end_ms)
        if new_pending and new_pending != pending:
            partials += 1
            last_change = now
        elif new_pending != pending:
            last_change = now
        pending = new_pending

    async with open_websocket_url(url, max_message_size=2**22) as ws:
        await ws.send_message(json.dumps(session_options(uid)))

        async def receive() -> None:
            nonlocal code
            try:
                while True:
                    message = json.loads(await ws.get_message())
                    now = trio.current_time()
                    if message.get("uid") not in (None, uid):
                        continue
                    if "status" in message:
                        if message["status"] in ("WAIT", "ERROR"):
                            failure.append(f"{message['status']}: {message.get('message')}")
                            ready.set()
                            return
                    elif message.get("message") == "SERVER_READY":
                        ready.set()
                    elif "segments" in message:
                        on_segments(message["segments"], now)
            except ConnectionClosed as closed:
                code = closed.reason.code if closed.reason else 0
            finally:
                ready.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            with trio.fail_after(READY_TIMEOUT_S):
                await ready.wait()
            if failure:
                raise RuntimeError(f"WhisperLive refused the session: {failure[0]}")
            start = trio.current_time()
            for index, offset in enumerate(range(0, len(samples), frame_samples)):
                if realtime:
                    await trio.sleep_until(start + index * frame_ms / 1000)
                sent_at.append(trio.current_time())
                await ws.send_message(samples[offset : offset + frame_samples].tobytes())
            # Let the server commit the tail: it has no flush on END_OF_AUDIO.
            last_frame = trio.current_time()
            while trio.current_time() - last_frame < MAX_DRAIN_S and not ws.closed:
                quiet = trio.current_time() - max(last_change, last_frame)
                if quiet >= DRAIN_TIMEOUT_S or (not pending and quiet >= QUIET_S):
                    break
                await trio.sleep(0.05)
            if pending:
                finals.append({"type": "final", "text": pending, "start_ms": pending_span[0],
                               "end_ms": pending_span[1], "flushed": True,
                               "received_s": trio.current_time()})
            if not ws.closed:
                try:
                    await ws.send_message(END_OF_AUDIO)
                except ConnectionClosed:
                    pass
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                while not ws.closed:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        if ws.closed is not None:
            code = code or ws.closed.code
    return StreamOutcome(finals, partials, latencies, code)


def _main() -> None:
    from benchmarks._common import load

    parser = argparse.ArgumentParser(description="Stream data files to a WhisperLive server.")
    parser.add_argument("--url", default="ws://127.0.0.1:9090")
    parser.add_argument("--gap-s", type=float, default=2.0, help="silence between files")
    parser.add_argument("--fast", action="store_true", help="send as fast as possible")
    parser.add_argument("files", nargs="+", help="names in benchmarks/data")
    args = parser.parse_args()
    gap = np.zeros(int(args.gap_s * RATE_HZ), dtype=np.float32)
    parts: list[np.ndarray] = []
    for name in args.files:
        parts += [load(name), gap]
    audio = np.concatenate(parts[:-1])
    print(f"streaming {len(audio) / RATE_HZ:.1f} s to {args.url}")
    outcome = trio.run(lambda: stream_whisperlive(args.url, audio, realtime=not args.fast))
    for final in outcome.finals:
        print(f"final {final['start_ms']:>6}-{final['end_ms']:<6} ms"
              f"{' (flushed)' if final['flushed'] else ''}: {final['text']}")
    print("latencies_s:", [round(x, 3) for x in outcome.latencies_s])
    print("partials:", outcome.partials, "close code:", outcome.close_code)


if __name__ == "__main__":
    _main()
