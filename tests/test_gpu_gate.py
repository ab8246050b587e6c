"""The GPU suite cannot pass by skipping: run as a GPU machine whose GPU is not usable would be
(CUDA_VISIBLE_DEVICES empty hides every device from torch and CTranslate2, and this machine may
have no vLLM at all), its tests are skipped, and with STTD_REQUIRE_GPU=1 every one fails."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]


async def _run_gpu_suite(**env: str) -> tuple[int, dict[str, int]]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("STT_", "STTD_"))}
    full.update(CUDA_VISIBLE_DEVICES="", **env)
    with trio.fail_after(120):
        result = await trio.run_process(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rN",
             "tests/gpu"], cwd=ROOT, env=full, capture_stdout=True, capture_stderr=True,
            check=False)
    summary = result.stdout.decode().strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)",
                                                     summary)}
    return result.returncode, counts


async def test_without_a_usable_gpu_the_suite_skips_and_under_require_gpu_it_fails() -> None:
    code, counts = await _run_gpu_suite()
    assert code == 0 and counts.get("skipped", 0) >= 6 and set(counts) == {"skipped"}
    required_code, required = await _run_gpu_suite(STTD_REQUIRE_GPU="1")
    # Failed in the test, or in its server fixture (pytest counts that one an error): red.
    assert required_code == 1 and "passed" not in required and "skipped" not in required
    assert required.get("failed", 0) + required.get("error", 0) == counts["skipped"]
