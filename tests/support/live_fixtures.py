"""One real server (uvicorn + vLLM on the tiny model) shared by the whole test session: the
e2e tests and the reliability tests' slow tier (fuzzing, soak) use the same engine. A plugin
(tests/conftest.py `pytest_plugins`), so every directory sees the one session fixture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_store
from tests.support.live_server import LiveServer, start_server

OPEN_POLICY = {"optional": ["alpha", "beta", "gamma"], "allow_base": True}
# any `vllm serve` flag reaches the engine through SAFEPATCH_VLLM_ARGS; a tool parser lets
# the parity tests make named tool calls (pythonic: it needs no special tokens)
VLLM_ARGS = "--enable-auto-tool-choice --tool-call-parser pythonic"


@pytest.fixture(scope="session")
def live_server(
    tiny_model: Path, patch_library: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("live")
    store = make_store(patch_library, root / "adapters", ("alpha", "beta", "gamma"))
    server = start_server(root, model=tiny_model, adapters=store, SAFEPATCH_VLLM_ARGS=VLLM_ARGS)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def open_key(live_server: LiveServer) -> str:
    """A tenant that may use the base model and every patch."""
    return live_server.tenant_key("open", OPEN_POLICY)
