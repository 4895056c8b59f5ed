"""Admin API of the patch registry: list/get, register (path and upload), validation at the door
with nothing left behind, delete, pin/unpin, and persistence across restarts."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.constants import CONFIG_FILE, WEIGHTS_FILE
from tests.api.conftest import NO_SCORING
from tests.conftest import ADMIN, make_settings, register_path
from tests.support.api_client import (
    adapter_files,
    adapter_names,
    assert_error,
    chat,
    model_ids,
    served_lora,
    store_listing,
    upload,
)
from tests.support.apps import running_app
from tests.support.fake_engine import FakeEngine

pytestmark = NO_SCORING


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
    assert (
        detail["sha256"] == hashlib.sha256((store / "beta" / WEIGHTS_FILE).read_bytes()).hexdigest()
    )
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
        assert detail["sha256"] == hashlib.sha256((gamma / WEIGHTS_FILE).read_bytes()).hexdigest()
        assert (store / "gamma-up" / WEIGHTS_FILE).read_bytes() == (
            gamma / WEIGHTS_FILE
        ).read_bytes()
        added = {p for p, _ in store_listing(store)} - {p for p, _ in before}
        assert {"gamma-up", f"gamma-up/{CONFIG_FILE}", f"gamma-up/{WEIGHTS_FILE}"} <= added
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
