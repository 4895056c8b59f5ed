"""The admin adapter API refuses what it must, and a refusal changes nothing (files, rows,
listing)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from app.constants import CONFIG_FILE as CONFIG
from app.constants import WEIGHTS_FILE as WEIGHTS
from tests.api.conftest import NO_SCORING
from tests.conftest import ADMIN, make_settings, make_store, register_path
from tests.support.api_client import (
    adapter_files,
    adapter_names,
    assert_error,
    patch_rows,
    store_listing,
    upload,
)
from tests.support.apps import running_app
from tests.support.lora_adapters import make_lora_adapter
from tests.support.tiny_model import build_tiny_llama

pytestmark = NO_SCORING


@pytest.fixture(scope="module")
def bad_adapters(
    tiny_model: Path, patch_library: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """One directory per validation failure, each otherwise a plausible adapter."""
    root = tmp_path_factory.mktemp("bad-adapters")
    alpha = patch_library / "alpha"

    def copy(name: str) -> Path:
        return Path(shutil.copytree(alpha, root / name))

    pickled = copy("pickled")
    torch.save(load_file(str(pickled / WEIGHTS)), pickled / "adapter_model.bin")

    (copy("bad-json") / CONFIG).write_text('{"peft_type": "LORA", "r": 4,')

    not_lora = copy("not-lora")
    config = json.loads((not_lora / CONFIG).read_text())
    (not_lora / CONFIG).write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))

    other_model = build_tiny_llama(root / "other-model", hidden_size=96, num_heads=3)
    make_lora_adapter(
        other_model, root / "other-base", r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=5
    )

    make_lora_adapter(
        tiny_model, root / "rank-too-large", r=40, alpha=40, target_modules=["q_proj"], seed=6
    )

    nan = copy("nan-weights")
    tensors = load_file(str(nan / WEIGHTS))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(nan / WEIGHTS), metadata={"format": "pt"})
    return {p.name: p for p in root.iterdir()}


# (adapter, status, code) for each failure, both ways in: upload and path inside the store.
FAILURES = [
    ("bad-json", 400, "invalid_config"),
    ("not-lora", 400, "not_lora"),
    ("other-base", 400, "base_model_mismatch"),
    ("rank-too-large", 400, "rank_too_large"),
    ("nan-weights", 400, "non_finite_weights"),
]


@pytest.fixture(scope="module")
def registry_app(
    scoring_calls: list[str],
    tiny_model: Path,
    patch_library: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TestClient, Path]]:
    """One app for the refusal tests: each checks that it changed nothing."""
    root = tmp_path_factory.mktemp("registry")
    store = make_store(patch_library, root / "adapters")
    with running_app(make_settings(tiny_model, root)) as (client, _):
        assert adapter_names(client) == ["alpha", "beta"]
        yield client, store


class Unchanged:
    """Snapshot of the store, the registry rows and the admin list; `check()` compares."""

    def __init__(self, client: TestClient, store: Path) -> None:
        self.client, self.store = client, store
        self.before = self._take()

    def _take(self) -> tuple:
        return store_listing(self.store), patch_rows(self.client), adapter_names(self.client)

    def check(self) -> None:
        files, rows, names = self._take()
        assert files == self.before[0], "the store directory changed"
        assert rows == self.before[1], "the registry database changed"
        assert names == self.before[2], "/admin/adapters changed"


@pytest.mark.parametrize(("adapter", "status", "code"), FAILURES)
def test_refused_upload_changes_nothing(
    registry_app, bad_adapters, adapter: str, status: int, code: str
) -> None:
    client, store = registry_app
    state = Unchanged(client, store)
    response = upload(client, "incoming", adapter_files(bad_adapters[adapter]))
    error = assert_error(response, status, code)
    assert error["message"]
    state.check()
    assert not (store / "incoming").exists()


@pytest.mark.parametrize(
    ("adapter", "status", "code"), [*FAILURES, ("pickled", 400, "pickle_weights_refused")]
)
def test_refused_path_registration_changes_nothing(
    registry_app, bad_adapters, adapter: str, status: int, code: str
) -> None:
    client, store = registry_app
    shutil.copytree(bad_adapters[adapter], store / adapter)
    try:
        state = Unchanged(client, store)
        response = register_path(client, adapter, adapter)
        assert_error(response, status, code)
        state.check()
        assert client.get(f"/admin/adapters/{adapter}", headers=ADMIN).status_code == 404
    finally:
        shutil.rmtree(store / adapter)


def test_pickled_upload_is_refused(registry_app, bad_adapters) -> None:
    client, store = registry_app
    state = Unchanged(client, store)
    pickled = bad_adapters["pickled"]
    response = upload(
        client,
        "pickled",
        {
            CONFIG: (pickled / CONFIG).read_bytes(),
            "adapter_model.bin": (pickled / "adapter_model.bin").read_bytes(),
        },
    )
    error = assert_error(response, 400, "pickle_weights_refused")
    assert "adapter_model.bin" in error["message"]
    # a pickle next to valid safetensors is refused too
    pickle_bytes = (pickled / "adapter_model.bin").read_bytes()
    response = upload(
        client, "pickled", {**adapter_files(pickled), "adapter_model.bin": pickle_bytes}
    )
    assert_error(response, 400, "pickle_weights_refused")
    state.check()


@pytest.mark.parametrize(
    ("files", "code"),
    [
        ({CONFIG: b"{}"}, "missing_files"),
        ({WEIGHTS: b"\0" * 16}, "missing_files"),
        ({"model.py": b"print(1)"}, "unexpected_file"),
    ],
)
def test_incomplete_upload_is_refused(registry_app, files: dict[str, bytes], code: str) -> None:
    client, store = registry_app
    state = Unchanged(client, store)
    assert_error(upload(client, "partial", files), 400, code)
    state.check()


def test_corrupt_safetensors_upload_is_refused(registry_app, patch_library) -> None:
    client, store = registry_app
    state = Unchanged(client, store)
    files = {**adapter_files(patch_library / "gamma"), WEIGHTS: b"\x08\0\0\0\0\0\0\0{bad json"}
    assert_error(upload(client, "corrupt", files), 400, "invalid_weights")
    state.check()


@pytest.mark.parametrize(
    "name",
    ["../x", "a/b", "..", ".hidden", "Upper", "sp ace", "x" * 64, "a+b", "stack-mine", "ünï"],
)
def test_unsafe_name_is_refused(registry_app, patch_library, name: str) -> None:
    client, store = registry_app
    state = Unchanged(client, store)
    assert_error(upload(client, name, adapter_files(patch_library / "gamma")), 400, "invalid_name")
    shutil.copytree(patch_library / "gamma", store / "gamma-copy")
    try:
        state = Unchanged(client, store)
        response = register_path(client, name, "gamma-copy")
        assert_error(response, 400, "invalid_name")
        state.check()
    finally:
        shutil.rmtree(store / "gamma-copy")


def test_missing_name_is_refused(registry_app, patch_library) -> None:
    client, store = registry_app
    state = Unchanged(client, store)
    assert_error(upload(client, None, adapter_files(patch_library / "gamma")), 400, "missing_name")
    state.check()


def test_path_outside_the_store_is_refused(registry_app, patch_library) -> None:
    client, store = registry_app
    link = store / "link-out"
    link.symlink_to(patch_library / "gamma", target_is_directory=True)
    try:
        state = Unchanged(client, store)
        for path in [
            "../x",
            "../../gamma",
            str(patch_library / "gamma"),
            ".",
            "",
            "alpha/../../adapters",
            "link-out",
        ]:
            response = register_path(client, "outside", path)
            error = assert_error(response, 400, "path_outside_store")
            assert error["param"] == "path"
        assert_error(
            register_path(client, "outside", "no-such-dir"),
            400,
            "adapter_not_found",
        )
        state.check()
    finally:
        link.unlink()


@pytest.mark.parametrize("body", [b'{"name": "x"}', b"not json", b'{"name": 1, "path": []}'])
def test_malformed_register_body_is_400(registry_app, body: bytes) -> None:
    client, store = registry_app
    state = Unchanged(client, store)
    response = client.post(
        "/admin/adapters", content=body, headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert_error(response, 400, "invalid_body")
    state.check()


def test_registering_a_taken_name_is_409(registry_app, patch_library) -> None:
    client, store = registry_app
    state = Unchanged(client, store)
    assert_error(
        register_path(client, "alpha", "beta"),
        409,
        "conflict",
    )
    assert_error(upload(client, "alpha", adapter_files(patch_library / "gamma")), 409, "conflict")
    state.check()


def test_too_large_adapter_is_refused(
    tiny_model: Path, patch_library: Path, tmp_path: Path
) -> None:
    store = make_store(patch_library, tmp_path / "adapters", names=("alpha",))
    # gamma's weights file alone is larger than 4 kB
    assert (patch_library / "gamma" / WEIGHTS).stat().st_size > 4096
    settings = make_settings(tiny_model, tmp_path, max_adapter_bytes=4096)
    shutil.copytree(patch_library / "gamma", tmp_path / "gamma")
    with running_app(settings) as (client, _):
        assert adapter_names(client) == []  # alpha is too large as well: skipped at the scan
        state = Unchanged(client, store)
        assert_error(
            upload(client, "gamma", adapter_files(patch_library / "gamma")), 400, "too_large"
        )
        assert_error(
            register_path(client, "alpha", "alpha"),
            400,
            "too_large",
        )
        huge = {CONFIG: b"{}", WEIGHTS: b"\0" * 1_100_000}
        assert_error(upload(client, "huge", huge), 413, "payload_too_large")
        state.check()
