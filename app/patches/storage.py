"""Storage faults of the adapter store and stack cache, as domain errors, and directory removal that
no reader (nor a restart after a crash) can observe half-done."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from pathlib import Path

from app.exceptions import StorageFailure, StorageFull

logger = logging.getLogger(__name__)

TRASH_SUFFIX = ".trash"  # a directory being removed; start-up scans skip dot-names
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}


def storage_error(exc: OSError, doing: str) -> StorageFailure:
    """The domain error for an OSError met while `doing` (e.g. 'storing the adapter'):
    StorageFull for a full disk or quota (507), StorageFailure for an unwritable store or any
    other I/O failure (500). The message names the failure, not the server's paths."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in _FULL:
        return StorageFull(
            f"{doing} failed: the server's storage is full ({reason}); nothing was changed"
        )
    if exc.errno in _READ_ONLY:
        return StorageFailure(
            f"{doing} failed: the server's storage is not writable ({reason}); nothing was changed",
            code="storage_not_writable",
        )
    return StorageFailure(f"{doing} failed: storage error ({reason}); nothing was changed")


def remove_dir(path: Path) -> None:
    """Delete the directory `path`: first renamed to a hidden sibling (atomic), so that a reader
    sees the whole directory or none of it, then deleted. Failures are logged, not raised (the
    caller's state change is already done; a leftover '.*.trash' dir is harmless)."""
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TRASH_SUFFIX}")
    try:
        os.rename(path, trash)
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, exc)
        return
    shutil.rmtree(trash, ignore_errors=True)
