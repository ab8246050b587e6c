"""The whisper backend (the bundled tiny.en) on CUDA in float16, end to end, one server start.

It needs no hub weights, so it is the GPU path any CUDA machine can check. Skipped where
CTranslate2 sees no CUDA device (CI), failed instead under STTD_REQUIRE_GPU=1:

    uv sync --extra cuda && STTD_REQUIRE_GPU=1 uv run pytest tests/gpu/test_whisper_cuda.py -v
"""

from __future__ import annotations

import trio

from tests.conftest import wer
from tests.gpu.conftest import DATA, ServedBackend, clip_names, refs, stream_file

# tiny.en streams the shared clips at about 5-7% WER on the CPU (benchmarks/README.md); float16
# on CUDA decodes the same model.
MAX_WER = 0.12


async def test_streamed_clips_on_cuda(whisper_cuda_server: ServedBackend) -> None:
    expected, heard = [], []
    with trio.fail_after(300):
        for name in clip_names():
            messages = await stream_file(whisper_cuda_server, name)
            assert [m for m in messages if m["type"] == "error"] == [], name
            expected.append(refs()[name])
            heard.append(" ".join(str(m["text"]) for m in messages
                                  if m["type"] == "final" and m["text"]))
    assert wer(" ".join(expected), " ".join(heard)) <= MAX_WER
    loaded = whisper_cuda_server.logged("whisper.loaded")
    assert loaded and loaded[0]["device"] == "cuda" and loaded[0]["compute_type"] == "float16"


async def test_a_long_file_over_the_openai_api_with_word_times(
        whisper_cuda_server: ServedBackend) -> None:
    import httpx

    audio = (DATA / "long_dev.wav").read_bytes()
    async with httpx.AsyncClient(timeout=300) as client:
        response = await client.post(
            f"{whisper_cuda_server.http_url}/v1/audio/transcriptions",
            data={"model": "whisper-1", "response_format": "verbose_json",
                  "timestamp_granularities[]": "word"},
            files={"file": ("long_dev.wav", audio, "audio/wav")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["words"] and all(w["start"] <= w["end"] for w in body["words"])
    assert wer(refs()["long_dev"], body["text"]) <= MAX_WER
