"""The page at / in a real headless Chromium, fed speech through Chromium's fake microphone.

Chromium plays a WAV file as its microphone (``--use-file-for-fake-audio-capture``) in real time;
the page downsamples it to 16 kHz in its AudioWorklet and streams it to the in-process server,
whose mock backend knows the fixtures. Playwright drives Debian's ``chromium`` (no downloaded
browser) through its sync API, in a worker thread, since its async API needs asyncio.

``STTD_BROWSER_SCREENSHOT=docs/browser.png uv run pytest tests/test_browser.py`` also saves a
screenshot of the page after the streaming test.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import pytest
import trio
from playwright.sync_api import Page, expect, sync_playwright

from sttd.audio import encode_wav, pcm16_to_float32
from tests.conftest import RunningServer, load_pcm, reference_texts, silence, start_server

CHROMIUM = "/usr/bin/chromium"  # Debian's package; .ci/run installs it
# Bounds every wait on the page; the fake microphone plays 5.6 s of audio in real time.
PAGE_TIMEOUT_MS = 30_000
FIXTURES = ("ps_goforward", "ps_cards_001")
SCREENSHOT_ENV = "STTD_BROWSER_SCREENSHOT"
# Playwright adds --headless and a fresh temporary --user-data-dir. The background-networking
# flags keep Chromium from calling out at start-up, which a machine with no network (CI) refuses.
CHROMIUM_ARGS = (
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
)

# .ci/run installs chromium and sets STTD_REQUIRE_BROWSER: there a missing browser fails the
# suite instead of skipping it; elsewhere these tests skip without it.
pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK) and not os.environ.get("STTD_REQUIRE_BROWSER"),
    reason="needs Debian's chromium (apt-get install chromium)")

T = TypeVar("T")

# Playwright's assertions wait 5 s by default: too short for speech played in real time.
expect.set_options(timeout=PAGE_TIMEOUT_MS)


def _fake_microphone_wav(directory: Path) -> Path:
    """The fixtures with 1 s of silence before, between and after, as a 16 kHz WAV file.

    The leading second covers the time from the microphone opening to the worklet running.
    """
    parts = [silence(1.0)]
    for name in FIXTURES:
        parts += [load_pcm(name), silence(1.0)]
    path = directory / "fake-microphone.wav"
    path.write_bytes(encode_wav(pcm16_to_float32(np.concatenate(parts))))
    return path


def _in_chromium(url: str, microphone_wav: Path, script: Callable[[Page], T]) -> T:
    """Open `url` in a fresh headless Chromium whose microphone plays `microphone_wav` once."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={microphone_wav}%noloop"])
        try:
            page = browser.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(url)
            return script(page)
        finally:
            browser.close()


async def _run_in_chromium(server: RunningServer, path: str, microphone_wav: Path,
                           script: Callable[[Page], T]) -> T:
    return await trio.to_thread.run_sync(
        partial(_in_chromium, server.http_url + path, microphone_wav, script))


def _stream_fixtures(page: Page, screenshot: str | None) -> str:
    """Start, wait for a partial and both finals, stop; returns the first partial's text."""
    texts = reference_texts()
    page.get_by_role("button", name="Start").click()
    expect(page.locator("#status")).to_contain_text("streaming")
    # A partial is on the page until its final replaces it, 500 ms of silence later at least.
    shown = page.wait_for_selector("#transcript p.partial")
    assert shown is not None
    partial_text = shown.text_content() or ""
    expect(page.locator("#transcript .final .text")).to_have_text([texts[n] for n in FIXTURES])
    expect(page.locator("#transcript .final .latency")).to_have_text(
        [re.compile(r"^\d+ ms$")] * len(FIXTURES))
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#status")).to_have_text(re.compile(r"^closed \(1000\b"))
    expect(page.locator("#transcript .partial")).to_have_count(0)
    expect(page.locator("#error")).to_be_hidden()
    if screenshot:
        page.set_viewport_size({"width": 900, "height": 640})
        page.screenshot(path=screenshot, full_page=True)
    return partial_text


async def test_page_streams_the_microphone_and_shows_partials_then_finals(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    server = await start_server(nursery)
    wav = _fake_microphone_wav(tmp_path)
    screenshot = os.environ.get(SCREENSHOT_ENV)
    partial_text = await _run_in_chromium(
        server, "/", wav, partial(_stream_fixtures, screenshot=screenshot))
    # The partial was a prefix of one fixture's words (the mock backend's partials are).
    words = partial_text.split()
    prefixes = {tuple(reference_texts()[n].split()[: len(words)]) for n in FIXTURES}
    assert words and tuple(words) in prefixes


def _with_and_without_key(page: Page, key: str) -> None:
    # /?token=KEY fills the key field, stores it, and leaves the address bar.
    expect(page.locator("#api-key")).to_have_value(key)
    assert "token" not in page.url
    page.get_by_role("button", name="Start").click()
    # A transcript comes back with the key (which fixture first depends on how soon the page
    # ran after the fake microphone opened: on a loaded machine the first can be missed).
    either = "|".join(re.escape(reference_texts()[name]) for name in FIXTURES)
    expect(page.locator("#transcript .final .text").first).to_have_text(
        re.compile(f"^({either})$"))
    # A field the form would refuse, typed while the session runs, must not block Stop (the
    # browser's form check did, and the microphone went on).
    page.locator("#language").fill("english!")
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#status")).to_have_text(re.compile(r"^closed \(1000\b"))
    page.locator("#language").fill("")

    page.locator("#api-key").fill("wrong-key")
    page.get_by_role("button", name="Start").click()
    expect(page.get_by_role("alert")).to_contain_text("unauthorized")
    expect(page.locator("#status")).to_have_text(re.compile(r"^closed \(1008\b"))
    expect(page.locator("#transcript p")).to_have_count(0)
    page.reload()
    expect(page.locator("#api-key")).to_have_value("wrong-key")  # the last key tried is kept


async def test_page_sends_the_api_key_and_shows_unauthorized(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    key = "browser-test-key"
    server = await start_server(nursery, api_keys=key)
    wav = _fake_microphone_wav(tmp_path)
    await _run_in_chromium(server, f"/?token={key}", wav,
                           partial(_with_and_without_key, key=key))


# Runs the page's worklet in an OfflineAudioContext at `rateHz` on a sine of `freqHz` (amplitude
# 0.5) and returns its 16 kHz output's level relative to the input's, in dB, and the frame sizes.
_WORKLET_LEVEL_JS = """async ([freqHz, rateHz]) => {
  const context = new OfflineAudioContext(1, 1.5 * rateHz, rateHz);
  await context.audioWorklet.addModule("/static/pcm-worklet.js");
  const node = new AudioWorkletNode(context, "pcm16-downsampler",
                                    {processorOptions: {frameSamples: 640}});
  const frames = [];
  const wanted = 30;  // of the 37 that 1.5 s makes
  const received = new Promise((resolve) => {
    node.port.onmessage = (event) => { if (frames.push(event.data) === wanted) resolve(); };
  });
  const sine = new OscillatorNode(context, {frequency: freqHz});
  sine.connect(new GainNode(context, {gain: 0.5})).connect(node).connect(context.destination);
  sine.start();
  await context.startRendering();
  await received;
  const samples = frames.slice(5).flatMap((frame) => {
    const view = new DataView(frame);
    return Array.from({length: frame.byteLength / 2}, (_, i) => view.getInt16(2 * i, true));
  });
  const rms = Math.sqrt(samples.reduce((sum, x) => sum + x * x, 0) / samples.length) / 32767;
  return [20 * Math.log10(Math.max(rms, 1e-9) / (0.5 * Math.SQRT1_2)),
          [...new Set(frames.map((frame) => frame.byteLength))]];
}"""


def _worklet_levels_db(page: Page) -> dict[tuple[int, int], tuple[float, list[int]]]:
    return {(rate_hz, freq_hz): page.evaluate(_WORKLET_LEVEL_JS, [freq_hz, rate_hz])
            for rate_hz in (48000, 44100) for freq_hz in (1000, 6000, 12000, 20000)}


async def test_worklet_low_passes_before_it_downsamples(nursery: trio.Nursery,
                                                        tmp_path: Path) -> None:
    server = await start_server(nursery)
    levels = await _run_in_chromium(server, "/", _fake_microphone_wav(tmp_path),
                                    _worklet_levels_db)
    for (rate_hz, freq_hz), (level_db, frame_sizes) in levels.items():
        assert frame_sizes == [1280], (rate_hz, frame_sizes)  # 40 ms of 16 kHz PCM16
        if freq_hz <= 6000:  # speech band: passed
            assert abs(level_db) < 1, (rate_hz, freq_hz, level_db)
        else:  # above 8 kHz: would alias into the speech band if samples were just dropped
            assert level_db < -60, (rate_hz, freq_hz, level_db)


STATIC = [
    ("/", "text/html; charset=utf-8"),
    ("/static/index.html", "text/html; charset=utf-8"),
    ("/static/app.js", "text/javascript; charset=utf-8"),
    ("/static/pcm-worklet.js", "text/javascript; charset=utf-8"),
    ("/static/style.css", "text/css; charset=utf-8"),
]


@pytest.mark.parametrize(("path", "content_type"), STATIC)
async def test_page_and_static_files_are_served(server: RunningServer, path: str,
                                                content_type: str) -> None:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    name = "index.html" if path == "/" else path.removeprefix("/static/")
    package_file = Path(__file__).resolve().parents[1] / "sttd" / "static" / name
    assert response.content == package_file.read_bytes()


@pytest.mark.parametrize("raw_path", [
    b"/static/../http.py", b"/static/..%2Fhttp.py", b"/static/%2e%2e/x", b"/static/nothing.js",
    b"/static/", b"/static/http.py", b"/static/../../pyproject.toml", b"/static/%2Fetc%2Fpasswd",
])
async def test_static_refuses_paths_and_unknown_names(server: RunningServer,
                                                      raw_path: bytes) -> None:
    async with httpx.AsyncClient(timeout=10, follow_redirects=True) as client:
        # Sent as written: httpx would otherwise resolve the dot segments itself.
        url = httpx.URL(server.http_url).copy_with(raw_path=raw_path)
        response = await client.get(url)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
