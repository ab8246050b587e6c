"""Plot p95 final latency against concurrent sessions for sttd and WhisperLive, and print ratios.

    uv run --group bench python benchmarks/peers/plot_compare.py \\
        benchmarks/results/compare_sttd.json benchmarks/results/compare_whisperlive.json \\
        benchmarks/results/compare.png
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

LIMIT_S = 1.5


def curve(result: dict[str, Any]) -> dict[int, list[float]]:
    """N -> p95 final latency of each run (runs without any final are left out)."""
    points: dict[int, list[float]] = {}
    for point in result["points"]:
        p95 = point["final_latency_s"]["p95"]
        if p95 is not None:
            points.setdefault(point["n"], []).append(p95)
    return points


def admitted_at(result: dict[str, Any]) -> dict[int, str]:
    """N -> the sessions admitted per run ("9-12"), where any were refused at connect."""
    refused: dict[int, list[int]] = {}
    for point in result["points"]:
        if point.get("sessions_refused"):
            refused.setdefault(point["n"], [])
    for point in result["points"]:
        if point["n"] in refused:
            refused[point["n"]].append(point["n"] - point.get("sessions_refused", 0))
    return {n: (f"{min(a)}-{max(a)}" if min(a) != max(a) else str(a[0]))
            for n, a in refused.items()}


def main() -> None:
    sttd_path, peer_path, out = (Path(arg) for arg in sys.argv[1:4])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sttd = json.loads(sttd_path.read_text())
    peer = json.loads(peer_path.read_text())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, result, marker in (("sttd", sttd, "o"), ("WhisperLive 0.10.0", peer, "s")):
        points = curve(result)
        ns = sorted(points)
        ax.plot(ns, [statistics.fmean(points[n]) for n in ns], marker=marker,
                label=f"{name} (capacity {result['capacity']})")
        for n in ns:  # every run, so the spread shows
            ax.scatter([n] * len(points[n]), points[n], marker=marker, s=12, alpha=0.4,
                       color=ax.lines[-1].get_color())
        for n, admitted in admitted_at(result).items():  # the p95 is of the admitted only
            ax.annotate(f"{admitted}\nadmitted", (n, statistics.fmean(points[n])),
                        textcoords="offset points", xytext=(0, -22), ha="center", fontsize=7,
                        color=ax.lines[-1].get_color())
    ax.axhline(LIMIT_S, linestyle="--", color="grey", linewidth=1)
    ax.text(1, LIMIT_S * 1.08, "1.5 s", color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent real-time sessions (N)")
    ax.set_ylabel("p95 final latency, s (log)")
    settings = sttd["settings"]
    start = "started together" if settings.get("together") else (
        f"starts spread over {settings.get('stagger_s')} s")
    ax.set_title(f"tiny.en int8, 2 vCPU, {settings.get('file', 'long_dev.wav')} in real time, "
                 f"{start}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    ours, theirs = curve(sttd), curve(peer)
    for n in sorted(set(ours) & set(theirs)):
        a, b = statistics.fmean(ours[n]), statistics.fmean(theirs[n])
        print(f"N={n}: sttd p95 {a:.2f} s, WhisperLive p95 {b:.2f} s, ratio {a / b:.3f}")


if __name__ == "__main__":
    main()
