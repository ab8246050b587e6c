"""What the session core costs a frame on the event loop, this tree against a baseline commit.

Every audio frame a session receives goes through its `SessionCore` on the event loop: the
utterance tracker's buffer, the endpointer's per-window RMS and state, the trim of the pre-roll.
At 100 sessions of 100 ms frames that is 1000 calls a second, and it is the part of sttd's
per-message cost (issue 17) that the bare stack does not have. This measures it alone, in one
process per tree, with nothing else on the loop:

* ``silence``: digital zeros (a muted microphone, a held call);
* ``line``: white noise at -50 dBFS, which Silero must score in every window;
* ``speech``: ``load.py``'s sentences stream, one pass (11 sentences with 1.2 s pauses), with
  its -50 dBFS line noise, so utterances open, grow and close.

The net itself is not measured here (the server scores it batched, off the loop; ``idle.py``
measures a whole server): a stand-in scores each window at once from its RMS, so both trees
see the same speech. ``--sessions`` cores are fed 100 ms frames in turn; the figure is the
thread CPU time per frame. The two trees run alternately, ``--runs`` times each, each in its
own process (the baseline from ``git archive``); reported are the medians and their ratio,
and the ratio of the least runs (on a shared machine, the cost with the least interference).

    uv run --group bench python benchmarks/frame_cost.py --baseline 80ccfc7 \\
        --out benchmarks/results/frame_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("silence", "line", "speech")
_FRAME_SAMPLES = 1600  # 100 ms at 16 kHz
_LINE_DBFS = -50.0


def _audio(scenario: str) -> np.ndarray:
    """The int16 stream each session of `scenario` is fed (the same for every session)."""
    from benchmarks.load import _stream
    from sttd.audio import float32_to_pcm16

    if scenario == "speech":  # load.py's, with its line noise
        return float32_to_pcm16(_stream("sentences-once", _LINE_DBFS).audio)
    if scenario == "silence":
        return np.zeros(20 * 16000, np.int16)
    noise = np.random.default_rng(0).normal(0.0, 10 ** (_LINE_DBFS / 20), 20 * 16000)
    return float32_to_pcm16(noise.astype(np.float32))


class _RmsNet:
    """Stands in for Silero: speech above -40 dBFS RMS, at once and for free.

    It goes by level alone, so the stream's gain (which raises a quiet line for the real net,
    and which Silero tells from speech) is set to 1 where it is used: `_unity_gain`."""

    def process(self, data: memoryview) -> float:
        window = np.frombuffer(data, np.float32)
        return 0.9 if float(window.dot(window)) > 1e-4 * window.size else 0.1

    def reset(self) -> None:
        return None


def _unity_gain(classifier: object) -> None:
    """Hear the stream as sent (a tree from before the gain has none to set)."""
    if hasattr(classifier, "max_gain"):
        classifier.max_gain = 1.0


def _child(scenario: str, sessions: int) -> float:
    """Seconds of thread CPU per frame through `sessions` cores (this process's tree)."""
    from werkzeug.datastructures import MultiDict

    from sttd.admission import session_core
    from sttd.api import NativeCodec
    from sttd.session import AudioFrame
    from sttd.settings import Settings
    from sttd.vad import run_steps, silero_model

    silero_model()
    settings = Settings(backend="mock", vad="silero")
    request = NativeCodec().accept(MultiDict({"call_id": "b", "sample_rate": "16000"}), settings)
    cores = [session_core(request, settings) for _ in range(sessions)]
    for core in cores:
        core.tracker.endpointer.classifier.net = _RmsNet()
        _unity_gain(core.tracker.endpointer.classifier)
    audio = _audio(scenario)
    frames = [audio[i : i + _FRAME_SAMPLES].copy()
              for i in range(0, audio.size - _FRAME_SAMPLES + 1, _FRAME_SAMPLES)]
    warm = 20
    for frame in frames[:warm]:
        for core in cores:
            run_steps(core.feed_steps(AudioFrame(frame, 0.0)))
    started = time.thread_time()
    for frame in frames[warm:]:
        for core in cores:
            run_steps(core.feed_steps(AudioFrame(frame, 0.0)))
    return (time.thread_time() - started) / ((len(frames) - warm) * sessions)


def _measure(tree: Path, scenario: str, sessions: int) -> float:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT}"}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", scenario,
         "--sessions", str(sessions)], cwd=tree, env=env, check=True, capture_output=True,
        text=True).stdout
    answer = json.loads(out.strip().splitlines()[-1])
    # The child must have run the tree it was given, not the installed one.
    assert Path(answer["sttd"]).resolve().is_relative_to(tree.resolve()), answer["sttd"]
    return float(answer["seconds_per_frame"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="HEAD", help="the commit to compare with")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/frame_cost.json")
    args = parser.parse_args()
    if args.child:
        import sttd
        print(json.dumps({"seconds_per_frame": _child(args.child, args.sessions),
                          "sttd": sttd.__file__}))
        return
    from benchmarks._common import source_tree, write_result

    points: list[dict[str, Any]] = []
    with source_tree(args.baseline) as (commit, baseline):
        for scenario in SCENARIOS:
            times: dict[str, list[float]] = {"baseline": [], "this_tree": []}
            for run in range(args.runs):
                order = [("baseline", baseline), ("this_tree", ROOT)]
                for name, tree in order if run % 2 == 0 else order[::-1]:
                    times[name].append(_measure(tree, scenario, args.sessions))
            medians = {name: statistics.median(values) for name, values in times.items()}
            point = {"scenario": scenario,
                     "us_per_frame": {name: round(value * 1e6, 1)
                                      for name, value in medians.items()},
                     "runs_us": {name: [round(v * 1e6, 1) for v in values]
                                 for name, values in times.items()},
                     "ratio": round(medians["this_tree"] / medians["baseline"], 3),
                     # The least of the runs: what the work costs when no neighbour slows it.
                     "ratio_of_least": round(min(times["this_tree"]) / min(times["baseline"]), 3)}
            print(point, flush=True)
            points.append(point)
    write_result(args.out, "uv run --group bench python " + " ".join(sys.argv),
                 {"baseline": commit, "sessions": args.sessions, "runs": args.runs,
                  "frame_ms": 100, "points": points})


if __name__ == "__main__":
    main()
