"""LD_PRELOAD for the engine processes: requested libraries first, user's entries kept."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.engine import cpu_tuning


def test_requested_libraries_go_first_and_user_entries_stay() -> None:
    tcmalloc = cpu_tuning.find_library("tcmalloc")
    if tcmalloc is None:
        pytest.skip("libtcmalloc-minimal4 not installed")
    assert cpu_tuning.engine_preload("tcmalloc", "/x/libgomp.so") == f"{tcmalloc}:/x/libgomp.so"
    assert cpu_tuning.engine_preload("none", "/x/libgomp.so") == "/x/libgomp.so"
    # The user's own tcmalloc wins; nothing is added twice.
    assert cpu_tuning.engine_preload("tcmalloc", "/opt/libtcmalloc.so") == "/opt/libtcmalloc.so"


def test_unknown_library_is_an_error() -> None:
    with pytest.raises(ValueError, match="jemalloc"):
        cpu_tuning.engine_preload("jemalloc", "")


def test_preloaded_tcmalloc_is_mapped_in_a_spawned_process() -> None:
    """What the engine processes get: a child started with this LD_PRELOAD maps tcmalloc."""
    environ: dict[str, str] = {"SAFEPATCH_CPU_PRELOAD": "tcmalloc"}
    cpu_tuning.apply_cpu_tuning(environ)
    if "LD_PRELOAD" not in environ:
        pytest.skip("libtcmalloc-minimal4 not installed")
    maps = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/maps').read())"],
        env={"LD_PRELOAD": environ["LD_PRELOAD"], "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "libtcmalloc_minimal" in maps
