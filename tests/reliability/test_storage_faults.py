"""Storage faults (issue 17): a full disk or an unwritable store during an upload, a stack build
on a full cache, and corrupt or partially deleted patch directories at start-up. Each is an
OpenAI-shaped error with a message, and the old state (store, database, listing) is intact."""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import app.patches.targets as targets_module
from app.constants import CONFIG_FILE as CONFIG
from app.constants import WEIGHTS_FILE as WEIGHTS
from tests.api.conftest import NO_SCORING
from tests.conftest import ADMIN, make_settings, make_store
from tests.support.api_client import (
    adapter_files,
    adapter_names,
    assert_error,
    chat,
    patch_rows,
    store_listing,
    upload,
)
from tests.support.apps import running_app

pytestmark = NO_SCORING


def snapshot(client: TestClient, store: Path) -> tuple:
    return store_listing(store), patch_rows(client), adapter_names(client)


def failing(
    real: Callable, err: int, when: Callable[[Path], bool]
) -> Callable[..., object]:  # a Path method that raises OSError(err) for the paths `when` picks
    def method(path: Path, *args: object, **kwargs: object) -> object:
        if when(path):
            raise OSError(err, f"injected: {errno.errorcode[err]}", str(path))
        return real(path, *args, **kwargs)

    return method


@pytest.fixture
def dev_settings(tiny_model: Path, store: Path, tmp_path: Path):
    return make_settings(tiny_model, tmp_path, dev_mode=True)


# --- uploads ----------------------------------------------------------------------------------
UPLOAD_FAULTS = [
    # (Path method, errno, which path, status, code)
    ("write_bytes", errno.ENOSPC, WEIGHTS, 507, "insufficient_storage"),
    ("write_bytes", errno.EDQUOT, CONFIG, 507, "insufficient_storage"),
    ("mkdir", errno.EACCES, ".incoming", 500, "storage_not_writable"),
    ("mkdir", errno.EROFS, ".incoming", 500, "storage_not_writable"),
    ("rename", errno.EIO, ".incoming", 500, "storage_error"),
    ("write_text", errno.ENOSPC, "safepatch.json", 507, "insufficient_storage"),  # after rename
]


@pytest.mark.parametrize(("method", "err", "where", "status", "code"), UPLOAD_FAULTS)
def test_a_storage_fault_during_an_upload_changes_nothing(
    dev_settings,
    patch_library: Path,
    store: Path,
    method: str,
    err: int,
    where: str,
    status: int,
    code: str,
) -> None:
    with running_app(dev_settings) as (client, _):
        before = snapshot(client, store)
        real = getattr(Path, method)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Path, method, failing(real, err, lambda p: where in str(p)))
            response = upload(client, "gamma", adapter_files(patch_library / "gamma"))
        error = assert_error(response, status, code)
        assert "storing adapter 'gamma' failed" in error["message"], error
        assert str(store) not in error["message"]  # no server paths in the message
        assert snapshot(client, store) == before
        # the store works again once the fault is gone
        assert upload(client, "gamma", adapter_files(patch_library / "gamma")).status_code == 201
        assert chat(client, model="gamma").status_code == 200


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 192 kB filesystem (tmpfs); needs root (or CAP_SYS_ADMIN), else skipped: the
    injected faults above cover the same code paths everywhere."""
    mount = tmp_path / "small-disk"
    if not _mount_tmpfs(mount, "192k"):
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=10)


def test_a_real_full_disk_during_an_upload(
    small_disk: Path, tiny_model: Path, patch_library: Path, tmp_path: Path
) -> None:
    store = make_store(patch_library, small_disk / "adapters", names=("alpha",))
    settings = make_settings(tiny_model, tmp_path, adapters_dir=store, dev_mode=True)
    with running_app(settings) as (client, _):
        assert adapter_names(client) == ["alpha"]
        free = shutil.disk_usage(small_disk).free
        gamma_size = sum(f.stat().st_size for f in (patch_library / "gamma").iterdir())
        filler = small_disk / "filler"  # leave room for less than gamma
        filler.write_bytes(b"\0" * max(free - gamma_size // 2, 0))
        before = snapshot(client, store)
        response = upload(client, "gamma", adapter_files(patch_library / "gamma"))
        error = assert_error(response, 507, "insufficient_storage")
        assert "storage is full" in error["message"]
        assert snapshot(client, store) == before
        filler.unlink()
        assert upload(client, "gamma", adapter_files(patch_library / "gamma")).status_code == 201


# --- a stack built on a full cache ------------------------------------------------------------
def test_a_full_disk_while_building_a_stack_is_507_and_serving_goes_on(
    dev_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with running_app(dev_settings) as (client, engine):
        real = targets_module.combine_adapters
        monkeypatch.setattr(targets_module, "combine_adapters", full)
        error = assert_error(chat(client, safety_patches=["alpha", "beta"]), 507)
        assert error["code"] == "insufficient_storage" and "stacked adapter" in error["message"]
        assert chat(client, safety_patches=["alpha"]).status_code == 200
        monkeypatch.setattr(targets_module, "combine_adapters", real)
        assert chat(client, safety_patches=["alpha", "beta"]).status_code == 200
        assert engine.calls[-1][1].name == "alpha+beta"


# --- start-up ---------------------------------------------------------------------------------
def test_start_up_skips_corrupt_and_partial_directories_with_a_log_line(
    tiny_model: Path, patch_library: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store(patch_library, tmp_path / "adapters", names=("alpha", "beta", "gamma"))
    (store / "beta" / WEIGHTS).write_bytes((store / "beta" / WEIGHTS).read_bytes()[:100])
    (store / "gamma" / CONFIG).unlink()  # partially deleted
    (store / "empty").mkdir()
    (store / ".alpha.1234.trash").mkdir()  # an interrupted delete: never scanned
    shutil.copy(patch_library / "alpha" / CONFIG, store / ".alpha.1234.trash" / CONFIG)
    caplog.set_level(logging.WARNING)
    with running_app(make_settings(tiny_model, tmp_path, dev_mode=True)) as (client, _):
        assert adapter_names(client) == ["alpha"]
        assert chat(client, model="alpha").status_code == 200
    logged = caplog.text
    assert "skipping adapter" in logged and "beta" in logged and "invalid_weights" not in logged
    assert "gamma" in logged and "no adapter_config.json" in logged
    assert ".alpha.1234.trash" not in logged


@pytest.mark.parametrize(
    "damage",
    ["weights-deleted", "weights-truncated", "directory-deleted", "weights-replaced"],
)
def test_a_registered_patch_damaged_on_disk_is_503_until_deleted(
    tiny_model: Path,
    patch_library: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    make_store(patch_library, tmp_path / "adapters")
    settings = make_settings(tiny_model, tmp_path, dev_mode=True)
    with running_app(settings) as (client, _):
        assert adapter_names(client) == ["alpha", "beta"]
    beta = tmp_path / "adapters" / "beta"
    if damage == "weights-deleted":
        (beta / WEIGHTS).unlink()
    elif damage == "weights-truncated":
        (beta / WEIGHTS).write_bytes((beta / WEIGHTS).read_bytes()[:-64])
    elif damage == "directory-deleted":
        shutil.rmtree(beta)
    else:
        shutil.copy(patch_library / "gamma" / WEIGHTS, beta / WEIGHTS)
    caplog.set_level(logging.WARNING)
    with running_app(settings) as (client, _):
        assert "safety patch beta is not served" in caplog.text
        assert adapter_names(client) == ["alpha", "beta"]  # still registered: fix or delete
        for request in ({"model": "beta"}, {"safety_patches": ["beta"]}):
            error = assert_error(chat(client, **request), 503, "patch_unavailable")
            assert "beta" in error["message"]
        assert_error(chat(client, safety_patches=["alpha", "beta"]), 503, "patch_unavailable")
        assert chat(client, model="alpha").status_code == 200
        assert client.delete("/admin/adapters/beta", headers=ADMIN).status_code == 204
        assert_error(chat(client, model="beta"), 404)
