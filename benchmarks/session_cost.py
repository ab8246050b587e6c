"""sttd's own cost per client message: whole sessions, no sockets, this tree against a baseline.

``idle.py`` measures a whole server against the bare serving stack, but two servers' CPU on a
shared 2-core machine moves by more than the changes worth making to sttd's own part of it.
This takes the sockets, hypercorn and the engine away and keeps everything of sttd's that a
message goes through: the codec, the converter, the receive task's limits and lag policy, the
audio channel, the infer task's round, the core and the VAD, the output path. ``--sessions``
`Session`\\ s run in one trio loop on a `MockClock`, each fed ``--frame-ms`` frames by a
transport that sleeps until each frame is due (so the loop waits on timers, as a server waits
on its sockets); the figure is the thread CPU time per message. The same loop with each session
replaced by a task that only awaits those frames is the floor: ``own_us`` is a session's
figure less it. Scenarios, as ``frame_cost.py`` has them:

* ``silence``: digital zeros (a muted microphone, a held call);
* ``line``: white noise at -50 dBFS, whose windows the VAD's net scores;
* ``speech``: ``load.py``'s sentences stream, one pass, with that line noise: utterances open,
  grow and close, and partials and finals are asked for (a stand-in engine answers at once).

The net is a stand-in that scores each window at once from its RMS (the server scores Silero
batched in a worker thread, which a MockClock would jump over), so the scenarios cost the same
on any tree. The two trees run alternately, ``--runs`` times each, each in its own process (the
baseline from ``git archive``); reported are the medians, their ratio, and the ratio of the
least runs.

    uv run --group bench python benchmarks/session_cost.py --baseline HEAD~1 \\
        --out benchmarks/results/session_cost.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.frame_cost import _LINE_DBFS, _RmsNet, _unity_gain  # noqa: E402  # the same stand-in net
SCENARIOS = ("silence", "line", "speech")


def _audio(scenario: str, seconds: float) -> np.ndarray:
    """The int16 stream each session of `scenario` is sent."""
    from benchmarks.load import _stream
    from sttd.audio import float32_to_pcm16

    if scenario == "speech":
        return float32_to_pcm16(_stream("sentences-once", _LINE_DBFS).audio)
    samples = int(seconds * 16000)
    if scenario == "silence":
        return np.zeros(samples, np.int16)
    noise = np.random.default_rng(0).normal(0.0, 10 ** (_LINE_DBFS / 20), samples)
    return float32_to_pcm16(noise.astype(np.float32))


def _child(scenario: str, sessions: int, frame_ms: int, seconds: float, floor: bool) -> float:
    """Seconds of thread CPU per message through `sessions` sessions (this process's tree)."""
    import trio
    import trio.testing
    from prometheus_client import CollectorRegistry
    from werkzeug.datastructures import MultiDict

    from sttd.admission import session_core
    from sttd.api import NativeCodec
    from sttd.backends import Request, Result
    from sttd.metrics import Metrics
    from sttd.nursery import Admission, Session
    from sttd.settings import Settings
    from sttd.vad import silero_model

    silero_model()  # loaded once, as the server does at start (the stand-in replaces its use)
    audio = _audio(scenario, seconds)
    step = 16 * frame_ms
    frames = [audio[i : i + step].tobytes() for i in range(0, audio.size - step + 1, step)]

    class Transport:
        def __init__(self, start: float) -> None:
            self.start, self.sent = start, 0

        async def receive(self) -> bytes | str:
            self.sent += 1
            await trio.sleep_until(self.start + self.sent * frame_ms / 1000)
            return frames[self.sent - 1] if self.sent <= len(frames) else '{"type": "end"}'

        async def send(self, text: str) -> bool:
            await trio.lowlevel.checkpoint()
            return True

        async def close(self, code: int, reason: str) -> None:
            return None

    class Engine:
        backend_name = "stand-in"

        def check_language(self, language: str | None) -> None:
            return None

        def check_hotwords(self, hotwords: Any) -> None:
            return None

        def overloaded(self) -> bool:
            return False

        @contextlib.contextmanager
        def live_stream(self) -> Iterator[None]:
            yield

        async def transcribe(self, request: Request, *, started: trio.Event | None = None
                             ) -> Result:
            if started is not None:
                started.set()
            await trio.lowlevel.checkpoint()
            return Result("some words" if request.kind == "final" else "some")

    @contextlib.contextmanager
    def unregistered(session: Session) -> Iterator[None]:
        yield

    async def floor_task(transport: Transport) -> None:
        while isinstance(await transport.receive(), bytes):
            pass

    async def main() -> float:
        settings = Settings(backend="mock", vad="silero")
        metrics = Metrics.create(CollectorRegistry())
        codec = NativeCodec()
        started = time.thread_time()
        async with trio.open_nursery() as nursery:
            for k in range(sessions):
                transport = Transport(trio.current_time() + k * 0.001)
                if floor:
                    nursery.start_soon(floor_task, transport)
                    continue
                request = codec.accept(MultiDict({"call_id": f"s{k}", "sample_rate": "16000"}),
                                       settings)
                core = session_core(request, settings)
                core.tracker.endpointer.classifier.net = _RmsNet()  # type: ignore[attr-defined]
                _unity_gain(core.tracker.endpointer.classifier)
                admission = Admission(request, core, Engine(), unregistered)
                nursery.start_soon(Session(admission, settings, metrics).run, transport, codec)
        return (time.thread_time() - started) / (sessions * (len(frames) + 1))

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _measure(tree: Path, scenario: str, args: argparse.Namespace, *, floor: bool) -> float:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT}"}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", scenario,
               "--sessions", str(args.sessions), "--frame-ms", str(args.frame_ms),
               "--seconds", str(args.seconds)] + (["--floor"] if floor else [])
    out = subprocess.run(command, cwd=tree, env=env, check=True, capture_output=True,
                         text=True).stdout
    answer = json.loads(out.strip().splitlines()[-1])
    # The child must have run the tree it was given, not the installed one.
    assert Path(answer["sttd"]).resolve().is_relative_to(tree.resolve()), answer["sttd"]
    return float(answer["seconds_per_message"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="HEAD", help="the commit to compare with")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--frame-ms", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="length of the silence and line streams (speech: its own)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/session_cost.json")
    args = parser.parse_args()
    if args.child:
        import sttd
        print(json.dumps({"seconds_per_message": _child(args.child, args.sessions,
                                                        args.frame_ms, args.seconds, args.floor),
                          "sttd": sttd.__file__}))
        return
    from benchmarks._common import source_tree, write_result

    points: list[dict[str, Any]] = []
    with source_tree(args.baseline) as (commit, baseline):
        for scenario in args.scenarios:
            times: dict[str, list[float]] = {"floor": [], "baseline": [], "this_tree": []}
            for run in range(args.runs):
                times["floor"].append(_measure(ROOT, scenario, args, floor=True))
                order = [("baseline", baseline), ("this_tree", ROOT)]
                for name, tree in order if run % 2 == 0 else order[::-1]:
                    times[name].append(_measure(tree, scenario, args, floor=False))
            medians = {name: statistics.median(values) for name, values in times.items()}
            floor = medians["floor"]
            point = {"scenario": scenario,
                     "us_per_message": {name: round(value * 1e6, 1)
                                        for name, value in medians.items()},
                     "own_us": {name: round((medians[name] - floor) * 1e6, 1)
                                for name in ("baseline", "this_tree")},
                     "runs_us": {name: [round(v * 1e6, 1) for v in values]
                                 for name, values in times.items()},
                     "ratio": round(medians["this_tree"] / medians["baseline"], 3),
                     "own_ratio": round((medians["this_tree"] - floor)
                                        / (medians["baseline"] - floor), 3),
                     # The least of the runs: what the work costs when no neighbour slows it.
                     "ratio_of_least": round(min(times["this_tree"]) / min(times["baseline"]),
                                             3)}
            print(point, flush=True)
            points.append(point)
    write_result(args.out, "uv run --group bench python " + " ".join(sys.argv),
                 {"baseline": commit, "sessions": args.sessions, "frame_ms": args.frame_ms,
                  "runs": args.runs, "points": points})


if __name__ == "__main__":
    main()
