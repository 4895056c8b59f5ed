"""Disk caches of the patch factory (base greedy targets, input moments): torch objects written
atomically, so a concurrent or interrupted writer never leaves a half-written file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from app.files import atomic_write


def load_cached(path: Path | None) -> Any | None:
    """The object saved at `path`, or None when there is no cache or no file yet."""
    if path is None or not path.is_file():
        return None
    return torch.load(path, weights_only=True)


def save_cached(obj: Any, path: Path | None) -> None:
    """torch.save to a private temporary sibling, then rename over `path` (no-op for None)."""
    if path is not None:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
