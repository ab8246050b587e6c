"""The nemo backend with sherpa-onnx on the tiny random-weight models in references/nemo/.

Their text is meaningless: these tests check structure and lifecycle (what is loaded, what is
fed, what is decoded together, what comes back when), never words.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import trio
from trio_websocket import open_websocket_url

from sttd.backends import nemo
from sttd.backends.base import Request
from sttd.backends.nemo import NemoBackend, NemoModel, NemoOptions, inspect_model
from sttd.backends.registry import resolve_backend_name
from sttd.errors import BackendError, ConfigError, Unsupported, UnsupportedLanguage
from sttd.settings import Settings
from tests.conftest import load_pcm, receive_until_close, send_pcm, silence, start_server

MODELS = Path(__file__).resolve().parents[1] / "references" / "nemo"
KINDS = ("offline-transducer", "offline-ctc", "online-transducer", "online-ctc")
RATE_HZ = 16000


def _audio(seconds: float) -> np.ndarray:
    speech = np.concatenate([load_pcm("ps_librivox_0880"), load_pcm("ps_goforward")])
    return speech[: int(seconds * RATE_HZ)].astype(np.float32) / 32768


def _options(kind: str, decoding: str = "greedy_search") -> NemoOptions:
    return NemoOptions(model=str(MODELS / kind), threads=1, decoding=decoding)


@pytest.fixture(scope="module")
def backends() -> dict[str, NemoBackend]:
    return {kind: NemoBackend.load(_options(kind)) for kind in KINDS}


@attrs.define(eq=False)
class FedStream:
    """A recognizer stream that counts the samples fed to it."""

    inner: Any
    fed: int = 0

    def accept_waveform(self, rate: int, samples: np.ndarray) -> None:
        self.fed += samples.size
        self.inner.accept_waveform(rate, samples)

    def input_finished(self) -> None:
        self.inner.input_finished()

    @property
    def result(self) -> Any:
        return self.inner.result


@attrs.define
class Spy:
    """Wraps a sherpa-onnx recognizer: its streams count what they are fed, and each decode
    call's number of streams is kept."""

    inner: Any
    streams: list[FedStream] = attrs.field(factory=list)
    batches: list[int] = attrs.field(factory=list)

    def create_stream(self, *args: Any) -> FedStream:
        stream = FedStream(self.inner.create_stream(*args))
        self.streams.append(stream)
        return stream

    def is_ready(self, stream: FedStream) -> bool:
        return bool(self.inner.is_ready(stream.inner))

    def decode_streams(self, streams: list[FedStream]) -> None:
        self.batches.append(len(streams))
        self.inner.decode_streams([stream.inner for stream in streams])

    def get_result_all(self, stream: FedStream) -> Any:
        return self.inner.get_result_all(stream.inner)


def _spied(kind: str) -> tuple[NemoBackend, Spy]:
    model = inspect_model(str(MODELS / kind))
    spy = Spy(nemo.build_recognizer(model, _options(kind)))
    return NemoBackend(spy, model, _options(kind)), spy


# -- what is in a folder ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_kind_is_told_from_the_files_and_their_metadata(kind: str) -> None:
    model = inspect_model(str(MODELS / kind))
    assert model.kind == kind
    assert model.streaming is kind.startswith("online")
    assert model.hotwords is kind.endswith("transducer")  # a bpe.vocab beside a transducer
    assert model.tdt is (kind == "offline-transducer")  # its url metadata says tdt
    assert (model.feature_dim, model.vocab_size) == (
        128 if kind == "offline-transducer" else 80, 43)


def test_the_committed_models_are_what_the_committed_script_makes(tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="the dev group installs onnx")
    for kind in KINDS:
        out = tmp_path / kind
        subprocess.run([sys.executable, str(MODELS / "make_tiny_nemo.py"), "--kind", kind,
                        "--out", str(out)], check=True, capture_output=True)
        names = sorted(p.name for p in (MODELS / kind).iterdir())
        assert sorted(p.name for p in out.iterdir()) == names
        _, mismatch, errors = filecmp.cmpfiles(MODELS / kind, out, names, shallow=False)
        assert (mismatch, errors) == ([], [])


def _broken(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind
    shutil.copytree(MODELS / kind, folder)
    return folder


def test_a_folder_that_is_no_model_says_what_it_holds_and_what_is_expected(
        tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError) as caught:
        inspect_model(str(tmp_path))
    message = str(caught.value)
    assert "holds notes.txt" in message
    assert "encoder.onnx + decoder.onnx + joiner.onnx + tokens.txt" in message
    assert "model.onnx + tokens.txt" in message
    with pytest.raises(ConfigError, match="no such folder"):
        inspect_model(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="STT_NEMO_MODEL must be a folder"):
        inspect_model("")


def test_a_file_that_is_not_onnx_is_named(tmp_path: Path) -> None:
    folder = _broken(tmp_path, "offline-ctc")
    (folder / "model.onnx").write_bytes(b"not a model at all")
    with pytest.raises(ConfigError, match="model.onnx is not an ONNX model"):
        inspect_model(str(folder))


def test_tokens_without_the_blank_last_are_refused(tmp_path: Path) -> None:
    folder = _broken(tmp_path, "online-ctc")
    lines = (folder / "tokens.txt").read_text().splitlines()
    (folder / "tokens.txt").write_text("\n".join(lines[:-1]) + "\n")  # <blk> dropped
    with pytest.raises(ConfigError, match="with the blank \\(<blk>\\) last, got 43"):
        inspect_model(str(folder))


def test_missing_metadata_is_named_before_sherpa_onnx_would_kill_the_process(
        tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="the dev group installs onnx")
    folder = _broken(tmp_path, "online-transducer")
    graph = onnx.load(str(folder / "encoder.onnx"))
    kept = [p for p in graph.metadata_props if p.key not in ("vocab_size", "chunk_shift")]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, str(folder / "encoder.onnx"))
    with pytest.raises(ConfigError, match="lacks the metadata vocab_size, chunk_shift"):
        inspect_model(str(folder))


def test_a_model_sherpa_onnx_dies_on_stops_start_up_with_its_message() -> None:
    """What no check foresees still cannot kill the server: the trial process dies instead."""
    # An offline model loaded as a streaming one: sherpa-onnx calls _Exit(-1) on it.
    wrong = attrs.evolve(inspect_model(str(MODELS / "offline-transducer")),
                         kind="online-transducer")
    with pytest.raises(BackendError) as caught:
        nemo._probe(wrong, _options("offline-transducer"))
    assert "trial process exited 255" in str(caught.value)
    assert "'window_size' does not exist in the metadata" in str(caught.value)  # its own words


def test_auto_still_picks_whisper_on_a_cpu() -> None:
    assert resolve_backend_name(Settings(backend="auto")) == "whisper"
    assert resolve_backend_name(Settings(backend="nemo")) == "nemo"


# -- streaming models ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["online-transducer", "online-ctc"])
def test_a_stream_is_fed_each_sample_once_and_its_final_is_the_whole_decode(kind: str) -> None:
    backend, spy = _spied(kind)
    audio = _audio(3.0)
    partials = [backend.transcribe([Request(audio[: n * RATE_HZ // 2], "partial",
                                            stream_id="a:0")])[0] for n in (2, 3, 4, 5)]
    [final] = backend.transcribe([Request(audio, "final", stream_id="a:0")])
    # One stream, fed the utterance once plus the flush; no re-decode of what it had.
    assert [stream.fed for stream in spy.streams] == [audio.size + int(nemo._FLUSH_S * RATE_HZ)]
    assert backend.live_streams == 0  # a final forgets its stream
    [whole] = backend.transcribe([Request(audio, "final")])  # all at once, on a new stream
    assert final.text == whole.text and final.text
    assert all(whole.text.startswith(p.text.split(" ")[0]) for p in partials if p.text)
    assert final.words and all(0 <= w.start_s <= w.end_s <= 3.0 for w in final.words)
    assert [p.words for p in partials] == [(), (), (), ()]


def test_the_streams_of_many_sessions_are_decoded_together() -> None:
    backend, spy = _spied("online-transducer")
    audio = _audio(2.0)
    requests = [Request(audio[: (3 + i % 2) * RATE_HZ // 2], "partial", stream_id=f"s{i}:0")
                for i in range(6)]  # 1.5 or 2 s: each has chunks ready to decode
    backend.transcribe(requests)
    assert backend.live_streams == 6
    assert spy.batches[0] == 6  # one decode call a step holds every stream with a chunk ready
    assert len(spy.batches) <= 3  # steps, not streams times steps


def test_a_stream_whose_final_went_is_started_again_from_the_audio_it_is_given() -> None:
    """A speculative final that speech outlived: the utterance's next request has all of its
    audio, so it is decoded from the start on a new stream."""
    backend, spy = _spied("online-ctc")
    audio = _audio(3.0)
    backend.transcribe([Request(audio[:RATE_HZ], "final", stream_id="a:0")])
    [again] = backend.transcribe([Request(audio[: 2 * RATE_HZ], "partial", stream_id="a:0")])
    assert [stream.fed for stream in spy.streams] == [RATE_HZ + int(nemo._FLUSH_S * RATE_HZ),
                                                     2 * RATE_HZ]
    assert backend.live_streams == 1


def test_streams_of_sessions_that_went_away_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, _ = _spied("online-transducer")
    clock = [1000.0]
    monkeypatch.setattr(nemo.time, "monotonic", lambda: clock[0])
    backend.transcribe([Request(_audio(1.0), "partial", stream_id="gone:3")])
    clock[0] += nemo._IDLE_STREAM_S + 1
    backend.transcribe([Request(_audio(1.0), "partial", stream_id="here:0")])
    assert backend.live_streams == 1


# -- offline models -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["offline-transducer", "offline-ctc"])
def test_offline_models_decode_a_call_in_one_batch(kind: str) -> None:
    backend, spy = _spied(kind)
    audio = _audio(3.0)
    results = backend.transcribe([Request(audio[: RATE_HZ * (i + 1)], kind)  # type: ignore[arg-type]
                                  for i, kind in enumerate(("partial", "final", "final"))])
    assert spy.batches == [3]
    assert results[0].words == () and results[2].text and results[2].words
    [alone] = backend.transcribe([Request(audio, "final")])
    assert alone.text == results[2].text  # a batch decodes as one at a time does


# -- languages and hotwords ---------------------------------------------------------------------


def test_english_only(backends: dict[str, NemoBackend]) -> None:
    backend = backends["online-ctc"]
    backend.check_language(None)
    backend.check_language("en-US")
    with pytest.raises(UnsupportedLanguage, match="got 'de'"):
        backend.check_language("de")


def test_hotwords_where_the_model_takes_them_and_a_clear_refusal_elsewhere(
        backends: dict[str, NemoBackend]) -> None:
    with pytest.raises(Unsupported, match="CTC models cannot be biased"):
        backends["online-ctc"].check_hotwords(("sttd",))
    with pytest.raises(Unsupported, match="STT_NEMO_DECODING=modified_beam_search"):
        backends["online-transducer"].check_hotwords(("sttd",))
    backends["offline-ctc"].check_hotwords(())  # none asked: nothing to refuse
    for kind in ("online-transducer", "offline-transducer"):
        biased = NemoBackend.load(_options(kind, "modified_beam_search"))
        biased.check_hotwords(("hello world", "sttd"))
        # Random weights say nothing true, but the boost reaches the search: the same audio
        # decodes otherwise with hotwords than without them (for one of a few, so that
        # float noise on another CPU cannot make this flaky).
        audio = _audio(3.0)
        [plain] = biased.transcribe([Request(audio, "final")])
        boosted = [biased.transcribe([Request(audio, "final", hotwords=hotwords)])[0].text
                   for hotwords in (("sttd",), ("the cat",), ("oat",))]
        assert plain.text and any(text != plain.text for text in boosted)
    with pytest.raises(ConfigError, match="needs a transducer"):
        NemoBackend.load(_options("online-ctc", "modified_beam_search"))


def test_without_sherpa_onnx_start_up_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sherpa_onnx", None)
    with pytest.raises(BackendError, match="uv sync --extra nemo"):
        NemoBackend.load(_options("online-ctc"))


# -- on the real server -------------------------------------------------------------------------


async def test_sessions_stream_partials_and_finals_through_one_streaming_model(
        nursery: trio.Nursery) -> None:
    server = await start_server(nursery, backend="nemo", vad="energy", load_timeout_s=60,
                                nemo_model=str(MODELS / "online-transducer"))
    speech = np.concatenate([load_pcm("ps_librivox_0880"), silence(1.0),
                             load_pcm("ps_goforward"), silence(1.0)])
    results: list[tuple[list[dict[str, Any]], int]] = []

    async def session(index: int) -> None:
        async with open_websocket_url(server.ws_url(f"call_id=n{index}&sample_rate=16000")
                                      ) as ws:
            ready = json.loads(await ws.get_message())
            assert (ready["type"], ready["backend"]) == ("ready", "nemo")
            for offset in range(0, speech.size, 1600):  # 100 ms frames, paced
                await send_pcm(ws, speech[offset : offset + 1600])
                await trio.sleep(0.02)
            await ws.send_message(json.dumps({"type": "end"}))
            results.append(await receive_until_close(ws))

    with trio.fail_after(120):
        async with trio.open_nursery() as sessions:
            for index in range(3):
                sessions.start_soon(session, index)
    backend = server.state.engine.backend  # type: ignore[union-attr]
    assert isinstance(backend, NemoBackend)
    for messages, code in results:
        assert code == 1000
        kinds = [m["type"] for m in messages]
        assert "error" not in kinds
        finals = [m for m in messages if m["type"] == "final"]
        assert [f["utterance_id"] for f in finals] == [0, 1]  # both utterances, in order
        assert all(f["text"] and f["words"] for f in finals)
        assert any(m["type"] == "partial" for m in messages)
    assert backend.live_streams == 0  # every utterance's stream finished and forgotten
    # One stream per utterance, never started over: 3 sessions x 2 utterances, and calibration's
    # warm-up and 3 rounds. (Partials of a pause past the tail used to feed audio the final ends
    # before, and every final decoded its utterance again.)
    assert backend.streams_started == 6 + 4


async def test_hotwords_on_a_ctc_model_are_refused_at_connect(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, backend="nemo", vad="energy", load_timeout_s=60,
                                nemo_model=str(MODELS / "online-ctc"))
    async with open_websocket_url(server.ws_url(
            "call_id=h&sample_rate=16000&hotwords=sttd")) as ws:
        messages, code = await receive_until_close(ws)
    assert (messages[0]["type"], messages[0]["code"], code) == ("error", "unsupported", 1008)
    assert "CTC models cannot be biased" in messages[0]["message"]


async def test_a_bad_model_folder_stops_start_up_naming_it(tmp_path: Path) -> None:
    env = {"STT_BACKEND": "nemo", "STT_NEMO_MODEL": str(tmp_path), "STT_PORT": "0",
           "PATH": "/usr/bin:/bin"}
    done = await trio.run_process([sys.executable, "-m", "sttd.cli", "serve"], env=env,
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode != 0
    assert f"STT_NEMO_MODEL={tmp_path} holds nothing" in done.stderr.decode()


@pytest.mark.parametrize("kind", ["offline-transducer", "online-ctc"])
async def test_a_file_is_transcribed_through_both_file_routes(nursery: trio.Nursery,
                                                              kind: str) -> None:
    import httpx

    server = await start_server(nursery, backend="nemo", vad="energy", load_timeout_s=60,
                                nemo_model=str(MODELS / kind))
    wav = (MODELS.parent / "ps_librivox_0880.wav").read_bytes()
    async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as client:
        native = await client.post("/v1/stt/transcribe", files={"file": ("a.wav", wav, "audio/wav")})
        openai = await client.post("/v1/audio/transcriptions",
                                   data={"model": "whisper-1", "response_format": "verbose_json"},
                                   files={"file": ("a.wav", wav, "audio/wav")})
    assert native.status_code == 200 and openai.status_code == 200
    body = native.json()
    # Random weights: some text, in segments that tile the speech, never checked for words.
    assert body["text"] and body["segments"]
    assert all(0 <= s["start_ms"] < s["end_ms"] <= body["duration_ms"] for s in body["segments"])
    assert openai.json()["text"] == body["text"]
