"""Two real `safepatch serve` processes (real uvicorn, real vLLM on the tiny model) on one
PostgreSQL database and one patch store, as behind a load balancer: what one replica changes
is in force on the other within the stated bound, PostgreSQL can go away and come back under
traffic, and both restart with everything still there.

Slow (two engines); the tests share one pair of servers and run in file order."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN, make_store
from tests.db.conftest import private_cluster
from tests.db.postgres import PostgresServer
from tests.db.replicas import STALENESS_BOUND_S, within
from tests.support.api_client import adapter_files, upload
from tests.support.live_server import LiveServer, start_server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("postgres_server")]

NOTICE_BOUND_S = 3.0  # a poll interval plus a refused connection


@dataclass
class Cluster:
    database: PostgresServer
    url: str
    model: Path
    store: Path
    roots: list[Path]
    servers: list[LiveServer]

    def start(self) -> None:
        self.servers = []
        for i, root in enumerate(self.roots):
            self.servers.append(
                start_server(
                    root,
                    model=self.model,
                    adapters=self.store,
                    SAFEPATCH_DATABASE_URL=self.url,
                    SAFEPATCH_REPLICA_ID=f"replica-{'ab'[i]}",
                    SAFEPATCH_CACHE_DIR=str(root / "cache"),
                )
            )

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="module")
def cluster(
    postgres_server: PostgresServer,
    tiny_model: Path,
    patch_library: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("replicas")
    store = make_store(patch_library, root / "adapters", names=("alpha", "beta"))
    with private_cluster() as database:
        roots = [root / "a", root / "b"]
        for path in roots:
            path.mkdir()
        cluster = Cluster(database, database.create_database(), tiny_model, store, roots, [])
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="module")
def a(cluster: Cluster) -> Iterator[httpx.Client]:
    with cluster.servers[0].client(timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def b(cluster: Cluster) -> Iterator[httpx.Client]:
    with cluster.servers[1].client(timeout=120) as http:
        yield http


def chat(http: httpx.Client, key: str, **extra) -> httpx.Response:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 2,
        "temperature": 0,
        **extra,
    }
    return http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def applied(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["X-SafePatch-Applied"]


def new_key(http: httpx.Client, tenant_id: str, policy: dict) -> tuple[str, str]:
    created = http.post("/admin/tenants", headers=ADMIN, json={"id": tenant_id, "policy": policy})
    assert created.status_code == 201, created.text
    key = http.post(f"/admin/tenants/{tenant_id}/keys", headers=ADMIN)
    assert key.status_code == 201, key.text
    return key.json()["id"], key.json()["key"]


def unloaded(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith('safepatch_adapter_events_total{event="unloaded"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_registered_on_a_served_on_b(a, b, patch_library: Path) -> None:
    assert upload(a, "gamma", adapter_files(patch_library / "gamma")).status_code == 201
    _, key = new_key(a, "acme", {"default": ["alpha"], "optional": ["gamma"]})
    seconds = within(
        STALENESS_BOUND_S, lambda: chat(b, key, safety_patches=["gamma"]).status_code == 200
    )
    print(f"registration + tenant + key on A served on B after {seconds:.3f} s")
    assert applied(chat(b, key, safety_patches=["gamma"])) == "alpha,gamma"


def test_revoked_on_a_refused_on_b(a, b) -> None:
    key_id, key = new_key(b, "globex", {"allow_base": True})  # made through B
    within(STALENESS_BOUND_S, lambda: chat(b, key).status_code == 200)
    assert a.delete(f"/admin/tenants/globex/keys/{key_id}", headers=ADMIN).status_code == 204
    seconds = within(STALENESS_BOUND_S, lambda: chat(b, key).status_code == 401)
    print(f"key revoked on A refused on B after {seconds:.3f} s")
    assert chat(b, key).json()["error"]["code"] == "invalid_api_key"


def test_deleted_on_a_is_404_on_b_and_unloaded(a, b, patch_library: Path) -> None:
    assert upload(a, "delta", adapter_files(patch_library / "gamma")).status_code == 201
    _, key = new_key(a, "initech", {"optional": ["delta"], "allow_base": True})
    within(STALENESS_BOUND_S, lambda: chat(b, key, safety_patches=["delta"]).status_code == 200)
    assert applied(chat(b, key, safety_patches=["delta"])) == "delta"  # loaded into B's engine
    before = unloaded(b)
    policy = {"allow_base": True}
    assert a.put("/admin/tenants/initech/policy", headers=ADMIN, json=policy).is_success
    assert a.delete("/admin/adapters/delta", headers=ADMIN).status_code == 204
    within(STALENESS_BOUND_S, lambda: chat(b, key, safety_patches=["delta"]).status_code == 404)
    assert b.get("/admin/adapters/delta", headers=ADMIN).status_code == 404
    within(5.0, lambda: unloaded(b) > before)  # B removed it from its engine


def test_racing_registrations_one_winner(a, b, cluster: Cluster, patch_library: Path) -> None:
    files = adapter_files(patch_library / "gamma")
    barrier = threading.Barrier(2)
    codes: list[int] = []

    def register(http: httpx.Client) -> None:
        barrier.wait()
        codes.append(upload(http, "epsilon", files).status_code)

    threads = [threading.Thread(target=register, args=(h,)) for h in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(codes) == [201, 409]
    assert sorted(p.name for p in cluster.store.iterdir()) == [
        "alpha",
        "beta",
        "epsilon",
        "gamma",
    ]  # one directory; no staging left behind, `delta` went with its deletion


def test_postgres_stopped_and_started_under_traffic(a, b, cluster: Cluster) -> None:
    _, key = new_key(a, "umbrella", {"default": ["alpha"], "allow_base": True})
    within(STALENESS_BOUND_S, lambda: chat(b, key).status_code == 200)
    failures: list[str] = []
    served = [0]
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=b.base_url, timeout=120) as http:
            while not stop.is_set():
                response = chat(http, key)
                served[0] += 1
                if response.status_code != 200:
                    failures.append(response.text)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        cluster.database.stop()
        for http in (a, b):
            within(
                NOTICE_BOUND_S,
                lambda h=http: h.get("/ready").json()["database"]["state"] == "unavailable",
            )
            assert http.get("/ready").status_code == 200
            response = http.post("/admin/tenants", headers=ADMIN, json={"id": "hooli"})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "database_unavailable"
        assert applied(chat(a, key)) == "alpha"
        time.sleep(1)
        cluster.database.start()
        for http in (a, b):
            within(
                NOTICE_BOUND_S, lambda h=http: h.get("/ready").json()["database"]["state"] == "ok"
            )
        policy = {"default": ["beta"], "allow_base": True}
        assert a.put("/admin/tenants/umbrella/policy", headers=ADMIN, json=policy).is_success
        within(STALENESS_BOUND_S, lambda: applied(chat(b, key)) == "beta")  # caught up
    finally:
        stop.set()
        sender.join(120)
    assert failures == [] and served[0] > 0


def test_both_restart_with_everything_there(a, b, cluster: Cluster) -> None:
    _, key = new_key(a, "stark", {"mandatory": ["gamma"], "optional": ["epsilon"]})
    cluster.stop()
    cluster.start()
    for server in cluster.servers:
        with server.client(timeout=120) as http:
            assert applied(chat(http, key, safety_patches=["epsilon"])) == "epsilon,gamma"
            assert http.get("/admin/adapters/delta", headers=ADMIN).status_code == 404
            names = [p["name"] for p in http.get("/admin/adapters", headers=ADMIN).json()["data"]]
            assert names == ["alpha", "beta", "epsilon", "gamma"]
            audit = http.get("/admin/audit", headers=ADMIN, params={"limit": 1000}).json()["data"]
            assert {e["replica"] for e in audit} >= {"replica-a", "replica-b"}
