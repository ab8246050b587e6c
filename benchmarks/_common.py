"""Helpers shared by the benchmarks: the data set, scoring, a server process, machine facts."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import trio

DATA = Path(__file__).resolve().parent / "data"
RESULTS = Path(__file__).resolve().parent / "results"
RATE_HZ = 16000


def references() -> dict[str, str]:
    """File name -> reference transcript, from benchmarks/data/refs.tsv."""
    rows = (line.split("\t", 1) for line in (DATA / "refs.tsv").read_text().splitlines() if line)
    return {name: text for name, text in rows}


def load(name: str) -> np.ndarray:
    """A data file as 16 kHz float32 samples."""
    from sttd.audio import decode_wav

    return decode_wav((DATA / name).read_bytes())


# The short recordings of the data set, for a stream of many short utterances.
_SENTENCE_FILES = ("ps_cards_001.wav", "ps_librivox_0880.wav", "ps_goforward.wav",
                   "ps_cards_002.wav", "ps_librivox_0930.wav", "ps_cards_003.wav",
                   "ps_librivox_0890.wav", "ps_cards_004.wav", "ps_librivox_0920.wav",
                   "ps_cards_005.wav", "ps_librivox_0870.wav")
_PAUSE_S = 1.2
# How far past a final's end its utterance's true end may lie (half the pause after it).
_END_SLACK_MS = 600
_QUIET_RMS = 0.003  # about -50 dBFS: below any speech in these clean recordings


@attrs.frozen
class Stream:
    """Audio to stream, its reference text, and where its speech truly ends (samples)."""

    audio: np.ndarray
    reference: str
    # The end of each stretch of speech, found in the clean source audio offline (not by the
    # server's VAD), so latency is measured from the speaker's real end of speech.
    speech_ends: tuple[int, ...] = ()
    # The start of each stretch of speech, found the same way: the first partial's wait is
    # measured from the speaker's real start of speech.
    speech_starts: tuple[int, ...] = ()


def sentences(repeats: int = 2) -> Stream:
    """Many short utterances: the data set's short recordings, trimmed, each followed by a
    1.2 s pause, `repeats` times in turn (22 utterances of 1-8 s, about 100 s)."""
    refs = references()
    pieces: list[np.ndarray] = []
    starts: list[int] = []
    ends: list[int] = []
    texts: list[str] = []
    position = 0
    pause = np.zeros(int(_PAUSE_S * RATE_HZ), np.float32)
    for turn in range(repeats):
        order = _SENTENCE_FILES if turn % 2 == 0 else _SENTENCE_FILES[::-1]
        for name in order:
            clip = _trimmed(load(name))
            pieces += [clip, pause]
            starts.append(position)
            position += clip.size
            ends.append(position)
            position += pause.size
            texts.append(refs[name])
    return Stream(np.concatenate(pieces), " ".join(texts), tuple(ends), tuple(starts))


def _trimmed(clip: np.ndarray) -> np.ndarray:
    """`clip` from its first to its last 10 ms frame above `_QUIET_RMS`."""
    hop = RATE_HZ // 100
    frames = clip[: clip.size - clip.size % hop].reshape(-1, hop)
    loud = np.flatnonzero(np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) > _QUIET_RMS)
    return clip[loud[0] * hop : (loud[-1] + 1) * hop]


def wer(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER after Whisper's English normalizer, as a fraction."""
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    r = [normalize(x) or "<empty>" for x in refs]
    h = [normalize(x) for x in hyps]
    return float(jiwer.wer(r, h))


def machine() -> dict[str, Any]:
    model = "unknown"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    info: dict[str, Any] = {"platform": platform.platform(),
                            "python": platform.python_version(), "cpus": os.cpu_count(),
                            "cpu_model": model,
                            # Machines that /proc/cpuinfo names alike ("AMD EPYC") differed 3x
                            # in speed, and CTranslate2's int8 kernels decode differently with
                            # AVX-512 than without: say which this one has.
                            "avx512": any(f.startswith("avx512") for f in flags)}
    gpus = _gpus()
    if gpus:
        info["gpus"] = gpus
    return info


def _gpus() -> list[str]:
    """Each NVIDIA GPU's name, memory and driver, from nvidia-smi; [] where there is none."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def write_result(path: Path, command: str, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": machine(), **payload}
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {path}")


@attrs.frozen
class ServerProcess:
    process: trio.Process
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, query: str) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stt/ws?{query}"


@asynccontextmanager
async def sttd_server(*, argv: tuple[str, ...] = ("-m", "sttd.cli", "serve"),
                      tree: Path | None = None, **settings: str) -> AsyncIterator[ServerProcess]:
    """Run ``sttd serve`` (or `argv` under this Python, which must log like it) as a child
    process on a free loopback port until the block exits; with `tree`, the sttd of that
    source tree (another commit's, for a baseline) rather than this one's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STT_")}
    env.update({"STT_HOST": "127.0.0.1", "STT_PORT": "0", "STT_LOG_FORMAT": "json", **settings})
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            lambda task_status: trio.run_process(
                [sys.executable, *argv], env=env, stderr=subprocess.PIPE, cwd=tree,
                check=False, task_status=task_status))
        assert process.stderr is not None
        buffer = b""
        port = None
        ready = False
        with trio.fail_after(120):
            while not ready:
                chunk = await process.stderr.receive_some()
                if not chunk:
                    raise RuntimeError(f"sttd exited early: {buffer.decode()[-2000:]}")
                buffer += chunk
                for line in buffer.decode(errors="replace").splitlines():
                    if '"server.listening"' in line:
                        port = int(re.search(r'"port": "(\d+)"', line).group(1))  # type: ignore[union-attr]
                    ready = ready or '"engine.ready"' in line
        nursery.start_soon(_drain, process.stderr)
        try:
            assert port is not None
            yield ServerProcess(process, port)
        finally:
            process.terminate()
            with trio.move_on_after(30):
                await process.wait()
            nursery.cancel_scope.cancel()


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


@attrs.frozen
class StreamOutcome:
    finals: list[dict[str, Any]]
    partials: int
    # Seconds from sending the audio at a final's speech end to receiving the final.
    latencies_s: list[float]
    close_code: int
    # Finals that start with the last stable prefix shown for their utterance, of those with one.
    stable_kept: int = 0
    stable_shown: int = 0
    # How late each frame left the client against its real-time schedule (send returned), in s.
    send_lag_s: np.ndarray = attrs.field(factory=lambda: np.zeros(0))
    # Seconds between consecutive partials of one utterance (and from its speech start to its
    # first partial), while it was open.
    partial_gaps_s: list[float] = attrs.field(factory=list)
    # The first of those per utterance alone: from its speech start to its first partial.
    first_partial_s: list[float] = attrs.field(factory=list)


async def stream_file(url: str, audio: np.ndarray, *, realtime: bool = True, frame_ms: int = 20,
                      tail_ms: int = 200, speech_ends: tuple[int, ...] = (),
                      speech_starts: tuple[int, ...] = (), preroll_ms: int = 300
                      ) -> StreamOutcome:
    """Stream float32 `audio` over one sttd session (through `sttd.client`), in real time unless
    `realtime` is False, and collect what comes back.

    A final's latency is counted from the moment the send of the audio at its speech end began:
    the true end from `speech_ends` (samples; the last one inside the final's span) where they
    are known, else the server's ``end_ms - tail_ms`` (it keeps ``tail_ms`` of audio after the
    last speech frame). A frame's send lag is how late its send returned against its real-time
    schedule.

    A first partial's wait is counted from the send of the utterance's true start of speech,
    from `speech_starts` where they are known: the last true start no later than the server's
    speech onset (its ``start_ms`` plus the ``preroll_ms`` of audio it keeps before it) and
    no earlier than half a pause before its ``start_ms``. Elsewhere (a piece of a sentence cut
    at a pause inside it, or no starts given) it counts from ``start_ms``, pre-roll included.
    """
    from functools import partial

    from sttd import client
    from sttd.audio import float32_to_pcm16

    sent_at: list[float] = []  # when each frame's send began
    lags: list[float] = []
    finals: list[dict[str, Any]] = []
    latencies: list[float] = []
    partials = 0
    last_stable: dict[int, str] = {}
    last_partial_at: dict[int, float] = {}
    partial_gaps: list[float] = []
    first_partials: list[float] = []
    kept = shown = 0
    ends_ms = [end * 1000 // RATE_HZ for end in speech_ends]
    starts_ms = [start * 1000 // RATE_HZ for start in speech_starts]

    def speech_start_ms(start_ms: int) -> int:
        """Where the speech of an utterance the server starts at `start_ms` truly began."""
        truly = [s for s in starts_ms if start_ms - _END_SLACK_MS <= s <= start_ms + preroll_ms]
        return truly[-1] if truly else start_ms

    used_ends: set[int] = set()

    def on_sent(index: int, due: float, sent: float) -> None:
        sent_at.append(sent)
        if realtime:
            lags.append(trio.current_time() - due)

    # A generous connect timeout: a load point starts N sessions at once.
    async with client.connect(url, call_id="bench", connect_timeout_s=60,
                              max_message_bytes=2**22) as session:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(client.stream_pcm, session, float32_to_pcm16(audio),
                                       fast=not realtime, frame_ms=frame_ms, on_sent=on_sent))
            async for message in session:
                if isinstance(message, client.Final):
                    finals.append(message.raw)
                    stable = _plain(last_stable.pop(message.utterance_id, ""))
                    if stable:
                        shown += 1
                        kept += _plain(message.text).startswith(stable)
                    last_partial_at.pop(message.utterance_id, None)
                    end_ms = max(message.end_ms - tail_ms, 0)
                    if ends_ms:
                        # The true ends this final covers; the VAD may end an utterance a little
                        # before the quiet tail that the offline trim still counts as speech.
                        inside = [e for e in ends_ms
                                  if message.start_ms <= e <= message.end_ms + _END_SLACK_MS
                                  and e not in used_ends]
                        if not inside:
                            continue  # a piece of an utterance cut at a pause inside it
                        end_ms = inside[-1]
                        used_ends.update(inside)
                    frame = end_ms // frame_ms
                    if frame < len(sent_at):
                        latencies.append(trio.current_time() - sent_at[frame])
                elif isinstance(message, client.Partial):
                    partials += 1
                    last_stable[message.utterance_id] = message.stable
                    now = trio.current_time()
                    since = last_partial_at.get(message.utterance_id)
                    first = since is None
                    if since is None:  # the first: from when its speech's start was sent
                        frame = speech_start_ms(message.start_ms) // frame_ms
                        since = sent_at[frame] if frame < len(sent_at) else now
                    partial_gaps.append(now - since)
                    if first:
                        first_partials.append(now - since)
                    last_partial_at[message.utterance_id] = now
        close_code = session.close_code or 0  # the server's, before the block closes ours
    return StreamOutcome(finals, partials, latencies, close_code, kept, shown,
                         np.asarray(lags, np.float32), partial_gaps, first_partials)


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@contextmanager
def source_tree(commit: str) -> Iterator[tuple[str, Path]]:
    """The project's tracked files at `commit` in a temporary folder (`git archive`), with
    the commit's short name: a baseline a benchmark runs beside this tree."""
    root = Path(__file__).resolve().parents[1]
    short = subprocess.run(["git", "rev-parse", "--short", commit], cwd=root, check=True,
                           capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", short], cwd=root, check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        yield short, Path(folder)
