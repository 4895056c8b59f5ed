"""File helpers every package shares: a file's sha256, an atomic file write and an atomic
directory replace."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

_PROGRESS_FROM = 64 << 20  # files at least this large hash with a progress bar


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (a progress bar for large files)."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        path.open("rb") as fh,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"sha256 {path.name}",
            disable=size < _PROGRESS_FROM,
        ) as bar,
    ):
        while block := fh.read(chunk):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Write `path` through `write(tmp)` on a private temporary sibling, then rename it over
    `path`: a concurrent or interrupted writer never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def fsync_dir(path: Path) -> None:
    """Flush every file in the directory `path` to disk (before renaming it into place)."""
    for file in path.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())


def replace_dir(new: Path, target: Path) -> None:
    """Rename the directory `new` to `target` (readers see the old one or the new one, never a
    mix); an existing `target` is moved aside first, then deleted."""
    try:
        os.rename(new, target)
        return
    except OSError:
        if not target.exists():
            raise
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(old, target)  # put the previous build back
        raise
    shutil.rmtree(old, ignore_errors=True)
