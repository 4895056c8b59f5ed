"""vLLM's engine process killed under load (as by the OOM killer): streams end promptly,
new requests are refused, `/ready` and `/health` fail, and the server exits non-zero so that
its supervisor restarts it. Nothing stored is lost."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import ADMIN, make_store
from tests.support.live_server import start_server

pytestmark = pytest.mark.slow
EXIT_BOUND_S = 30


def engine_core(pid: int) -> psutil.Process:
    children = psutil.Process(pid).children(recursive=True)
    found = [p for p in children if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert found, [p.cmdline() for p in children]
    return found[0]


def test_sigkill_of_the_engine_core_under_load(
    tiny_model: Path, patch_library: Path, tmp_path: Path
) -> None:
    store = make_store(patch_library, tmp_path / "adapters")
    server = start_server(tmp_path, model=tiny_model, adapters=store, SAFEPATCH_DEV_MODE="1")
    try:
        body = {
            "model": "alpha",
            "prompt": "once upon a time",
            "max_tokens": 200,
            "ignore_eos": True,
            "stream": True,
        }
        ended: dict[str, float] = {}

        def stream() -> None:
            with httpx.Client(base_url=server.base_url, timeout=60) as http:
                try:
                    with http.stream("POST", "/v1/completions", json=body) as response:
                        for _ in response.iter_lines():
                            pass
                except httpx.HTTPError:
                    pass
            ended["at"] = time.monotonic()

        workers = [threading.Thread(target=stream) for _ in range(4)]
        for worker in workers:
            worker.start()
        time.sleep(3)  # the streams are under way
        engine_core(server.process.pid).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for worker in workers:
            worker.join(EXIT_BOUND_S)
            assert not worker.is_alive(), "a stream hung after the engine died"
        code = server.process.wait(EXIT_BOUND_S)
        assert code != 0, "the server must exit non-zero so its supervisor restarts it"
        assert time.monotonic() - killed < EXIT_BOUND_S
    finally:
        server.stop()
    # what was stored is intact: a new server on the same database and store serves the patch
    again = start_server(tmp_path, model=tiny_model, adapters=store)
    try:
        with again.client() as http:
            listing = http.get("/admin/adapters", headers=ADMIN).json()
            assert sorted(a["name"] for a in listing["data"]) == ["alpha", "beta"]
    finally:
        again.stop()
        assert os.path.isdir(store / "alpha")
