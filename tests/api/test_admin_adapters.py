"""Admin API of the patch registry: list/get, register (path and upload), validation at the door
with nothing left behind, delete, pin/unpin, and persistence across restarts."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from app.config import Settings
from tests.api.conftest import NO_SCORING
from tests.conftest import ADMIN, make_settings, make_store, register_path
from tests.support.api_client import (
    adapter_files,
    adapter_names,
    assert_error,
    chat,
    model_ids,
    patch_rows,
    served_lora,
    store_listing,
    upload,
)
from tests.support.apps import running_app
from tests.support.fake_engine import FakeEngine
from tests.support.lora_adapters import make_lora_adapter
from tests.support.tiny_model import build_tiny_llama

pytestmark = NO_SCORING

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


# --- adapters that must be refused ----------------------------------------------------------
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


# --- the happy paths ------------------------------------------------------------------------
@pytest.fixture
def dev_settings(tiny_model: Path, store: Path, tmp_path: Path) -> Settings:
    """Dev mode: anonymous requests may use every registered patch."""
    return make_settings(tiny_model, tmp_path, dev_mode=True)


def test_list_and_get(api, store: Path) -> None:
    client, _ = api
    listing = client.get("/admin/adapters", headers=ADMIN).json()
    assert listing["object"] == "list"
    by_name = {a["name"]: a for a in listing["data"]}
    assert sorted(by_name) == ["alpha", "beta"]
    assert by_name["alpha"]["rank"] == 4 and by_name["beta"]["rank"] == 8
    assert sorted(by_name["beta"]["target_modules"]) == ["down_proj", "o_proj", "q_proj"]
    assert by_name["alpha"]["source"] == "scan" and not by_name["alpha"]["pinned"]
    detail = client.get("/admin/adapters/beta", headers=ADMIN).json()
    assert detail["path"] == str(store / "beta")
    assert detail["sha256"] == hashlib.sha256((store / "beta" / WEIGHTS).read_bytes()).hexdigest()
    assert detail["metadata"]["rank"] == 8
    assert_error(client.get("/admin/adapters/nope", headers=ADMIN), 404, "patch_not_found")


def test_register_from_path_serves_next_request(
    dev_settings: Settings, patch_library: Path, store: Path, scoring_calls
) -> None:
    with running_app(dev_settings) as (client, engine):
        assert_error(chat(client, model="gamma"), 404, "model_not_found")
        shutil.copytree(patch_library / "gamma", store / "gamma")
        response = register_path(client, "gamma", "gamma")
        assert response.status_code == 201, response.text
        assert response.json()["name"] == "gamma"
        assert response.json()["source"] == "path"
        assert response.json()["path"] == str(store / "gamma")
        assert "gamma" in scoring_calls
        assert adapter_names(client) == ["alpha", "beta", "gamma"]
        assert "gamma" in model_ids(client)
        served = chat(client, model="gamma")
        assert served.status_code == 200, served.text
        assert served.json()["choices"][0]["message"]["content"] == "gamma:0 gamma:1 "
        assert served_lora(engine) == "gamma"
        # the same directory may also be registered under a second name (absolute path)
        response = register_path(client, "gamma.v2", str(store / "gamma"))
        assert response.status_code == 201, response.text


def test_register_by_upload_serves_next_request(
    dev_settings: Settings, patch_library: Path, store: Path
) -> None:
    with running_app(dev_settings) as (client, engine):
        before = store_listing(store)
        gamma = patch_library / "gamma"
        response = upload(client, "gamma-up", adapter_files(gamma))
        assert response.status_code == 201, response.text
        detail = response.json()
        assert detail["source"] == "upload" and detail["rank"] == 4
        assert detail["sha256"] == hashlib.sha256((gamma / WEIGHTS).read_bytes()).hexdigest()
        assert (store / "gamma-up" / WEIGHTS).read_bytes() == (gamma / WEIGHTS).read_bytes()
        added = {p for p, _ in store_listing(store)} - {p for p, _ in before}
        assert {"gamma-up", f"gamma-up/{CONFIG}", f"gamma-up/{WEIGHTS}"} <= added
        assert not [p for p in added if not p.startswith("gamma-up")], added
        assert chat(client, model="gamma-up").status_code == 200
        assert served_lora(engine) == "gamma-up"


def test_delete_then_404_and_gone_from_models(
    dev_settings: Settings, patch_library: Path, store: Path
) -> None:
    with running_app(dev_settings) as (client, engine):
        assert upload(client, "gamma", adapter_files(patch_library / "gamma")).status_code == 201
        assert client.post("/admin/adapters/alpha/pin", headers=ADMIN).status_code == 200
        assert engine.pinned
        for name in ("alpha", "gamma"):
            assert chat(client, model=name).status_code == 200
            response = client.delete(f"/admin/adapters/{name}", headers=ADMIN)
            assert response.status_code == 204, response.text
            assert_error(
                client.get(f"/admin/adapters/{name}", headers=ADMIN), 404, "patch_not_found"
            )
            assert_error(
                client.delete(f"/admin/adapters/{name}", headers=ADMIN), 404, "patch_not_found"
            )
            assert_error(chat(client, model=name), 404, "model_not_found")
            assert_error(chat(client, safety_patches=[name]), 404, "patch_not_found")
            assert name not in model_ids(client)
            assert name not in adapter_names(client)
        assert model_ids(client) == ["tiny", "beta"]
        assert engine.loaded == {} and engine.pinned == set()  # unloaded from the engine
        assert not (store / "gamma").exists()  # an uploaded patch's files go with it
        assert (store / "alpha").is_dir()  # a scanned one's stay where the operator put them
        # the name is free again
        assert upload(client, "gamma", adapter_files(patch_library / "gamma")).status_code == 201


def test_pin_and_unpin_reach_the_engine(api) -> None:
    client, engine = api
    response = client.post("/admin/adapters/beta/pin", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["pinned"] is True
    (int_id,) = engine.pinned
    assert engine.loaded[int_id].name == "beta"
    assert engine.loaded[int_id].path.name == "beta"
    response = client.post("/admin/adapters/beta/unpin", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json()["pinned"] is False
    assert engine.pinned == set()
    assert engine.loaded[int_id].name == "beta"  # still loaded, no longer pinned
    assert client.get("/admin/adapters/beta", headers=ADMIN).json()["pinned"] is False
    assert_error(client.post("/admin/adapters/nope/pin", headers=ADMIN), 404, "patch_not_found")


def test_registrations_survive_a_restart(
    settings: Settings, patch_library: Path, store: Path
) -> None:
    with running_app(settings) as (client, _):
        shutil.copytree(patch_library / "gamma", store / "gamma-dir")
        assert upload(client, "uploaded", adapter_files(patch_library / "gamma")).status_code == 201
        assert register_path(client, "by-path", "gamma-dir").status_code == 201
        assert client.post("/admin/adapters/beta/pin", headers=ADMIN).status_code == 200
        assert client.delete("/admin/adapters/alpha", headers=ADMIN).status_code == 204
        before = client.get("/admin/adapters", headers=ADMIN).json()["data"]
    assert (store / "alpha").is_dir()  # a deleted scanned patch is still in the store...
    with running_app(settings) as (client, engine):
        after = client.get("/admin/adapters", headers=ADMIN).json()["data"]
        assert after == before
        assert [a["name"] for a in after] == ["beta", "by-path", "uploaded"]  # ...but not back
        assert {a["name"]: a["source"] for a in after} == {
            "beta": "scan",
            "by-path": "path",
            "uploaded": "upload",
        }
        assert [engine.loaded[i].name for i in engine.pinned] == ["beta"]  # pinned at start-up
        assert_error(client.get("/admin/adapters/alpha", headers=ADMIN), 404)


def test_a_deleted_scanned_patch_stays_deleted_across_restarts(
    settings: Settings, store: Path
) -> None:
    with running_app(settings) as (client, _):
        assert client.delete("/admin/adapters/beta", headers=ADMIN).status_code == 204
    for _ in range(2):
        with running_app(settings) as (client, _):
            assert adapter_names(client) == ["alpha"]
    # and it can be registered again on purpose
    with running_app(settings) as (client, _):
        response = register_path(client, "beta", "beta")
        assert response.status_code == 201, response.text
    with running_app(settings) as (client, _):
        assert adapter_names(client) == ["alpha", "beta"]


def test_a_patch_registered_under_another_name_is_not_rescanned(
    settings: Settings, patch_library: Path, store: Path
) -> None:
    """The start-up scan must not register a directory again under its own name when it is
    already registered (or was deleted) under another one."""
    with running_app(settings) as (client, _):
        shutil.copytree(patch_library / "gamma", store / "gamma-dir")
        for name in ("kept", "dropped"):
            assert register_path(client, name, "gamma-dir").status_code == 201
        assert client.delete("/admin/adapters/dropped", headers=ADMIN).status_code == 204
    with running_app(settings) as (client, _):
        assert adapter_names(client) == ["alpha", "beta", "kept"]


def test_delete_while_streaming_does_not_disturb_the_stream(
    dev_settings: Settings, patch_library: Path
) -> None:
    """The stream using a patch finishes; the engine unloads the patch only afterwards."""
    engine = FakeEngine(token_delay=0.02)
    with running_app(dev_settings, engine) as (client, _):
        assert client.post("/admin/adapters/alpha/pin", headers=ADMIN).status_code == 200
        (alpha_id,) = engine.pinned
        result: dict[str, httpx.Response] = {}

        def stream() -> None:
            result["r"] = chat(client, model="alpha", max_tokens=40, stream=True)

        worker = threading.Thread(target=stream)
        worker.start()
        deadline = time.monotonic() + 5
        while not engine.calls:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert client.delete("/admin/adapters/alpha", headers=ADMIN).status_code == 204
        assert upload(client, "gamma", adapter_files(patch_library / "gamma")).status_code == 201
        assert alpha_id in engine.loaded, "unloaded while a request still used it"
        worker.join(10)
        body = result["r"].text
        assert result["r"].status_code == 200
        assert body.count("alpha:") == 40 and body.rstrip().endswith("data: [DONE]")
        deadline = time.monotonic() + 5
        while alpha_id in engine.loaded:  # unloaded once the lease ends
            assert time.monotonic() < deadline, "never unloaded"
            time.sleep(0.01)
        assert_error(chat(client, model="alpha"), 404, "model_not_found")
        assert chat(client, model="gamma").status_code == 200
