"""SafePatch's own failures are the OpenAI error body {"error": {message, type, param, code}}
with the right status, and the server keeps answering after each one. Request validation is
vLLM's (tests/e2e/test_vllm_errors.py checks it against the real engine)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import NO_SCORING
from tests.conftest import make_settings, make_store
from tests.support.api_client import BASE, add_tenant, assert_error, chat
from tests.support.apps import running_app
from tests.support.fake_engine import FakeEngine

pytestmark = NO_SCORING

Client = tuple[TestClient, dict[str, str]]


@pytest.fixture(scope="module")
def served(
    scoring_calls: list[str],
    tiny_model: Path,
    patch_library: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Client]:
    """One app for the module: no test here may change its state."""
    root = tmp_path_factory.mktemp("errors")
    make_store(patch_library, root / "adapters")
    with running_app(make_settings(tiny_model, root)) as (client, _):
        yield client, add_tenant(client, "errors", optional=["alpha"], allow_base=True)


def still_serving(client: TestClient, headers: dict[str, str]) -> None:
    response = chat(client, headers)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "base:0 base:1 "


CHAT = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("value", ["alpha", [1], {"a": 1}])
def test_malformed_safety_patches_is_400(served: Client, value: object) -> None:
    """Checked by SafePatch before vLLM sees the request (vLLM validates everything else:
    tests/e2e/test_vllm_errors.py)."""
    client, headers = served
    error = assert_error(chat(client, headers, safety_patches=value), 400, "invalid_patch")
    assert error["param"] == "safety_patches"
    still_serving(client, headers)


def test_engine_errors_pass_through_in_their_shape(served: Client) -> None:
    client, headers = served
    error = assert_error(chat(client, headers, temperature=-1), 400)
    assert "temperature" in error["message"]
    still_serving(client, headers)


def post(client: TestClient, headers: dict[str, str], path: str, body: object) -> httpx.Response:
    return client.post(path, json=body, headers=headers)


@pytest.mark.parametrize("model", ["no-such-model", "alpha+nope", "../tiny", "tiny+alpha"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_unknown_model_is_404_model_not_found(served: Client, path: str, model: str) -> None:
    client, headers = served
    body = {"model": model, "max_tokens": 2, "prompt": "hi", "messages": CHAT["messages"]}
    error = assert_error(post(client, headers, path, body), 404, "model_not_found")
    assert error["param"] == "model"
    assert error["type"] == "not_found_error"
    assert model in error["message"]
    still_serving(client, headers)


def test_unknown_safety_patch_is_404(served: Client) -> None:
    client, headers = served
    error = assert_error(chat(client, headers, safety_patches=["nope"]), 404, "patch_not_found")
    assert "nope" in error["message"]
    still_serving(client, headers)


def test_unknown_route_and_method_use_the_error_shape(served: Client) -> None:
    client, headers = served
    assert_error(client.get("/v1/nothing-here", headers=headers), 404, "not_found")
    assert_error(client.get("/v1/chat/completions", headers=headers), 405)
    still_serving(client, headers)


def test_request_body_over_the_limit_is_413(tiny_model: Path, store: Path, tmp_path: Path) -> None:
    settings = make_settings(tiny_model, tmp_path, max_request_bytes=2_000)
    with running_app(settings) as (client, _):
        headers = add_tenant(client, "big", allow_base=True)
        body = {**CHAT, "messages": [{"role": "user", "content": "x" * 5_000}]}
        assert_error(post(client, headers, "/v1/chat/completions", body), 413, "payload_too_large")
        still_serving(client, headers)


def test_engine_not_ready_is_503_then_serves(tiny_model: Path, store: Path, tmp_path: Path) -> None:
    engine = FakeEngine(start_delay=1.0)
    with running_app(make_settings(tiny_model, tmp_path), engine, ready=False) as (client, _):
        headers = add_tenant(client, "early", allow_base=True)
        assert not engine.is_ready, "the engine started before the test could see it loading"
        for path, body in [
            ("/v1/chat/completions", CHAT),
            ("/v1/completions", {"model": BASE, "prompt": "hi"}),
        ]:
            error = assert_error(post(client, headers, path, body), 503, "not_ready")
            assert error["type"] == "service_unavailable"
        stream = post(client, headers, "/v1/chat/completions", {**CHAT, "stream": True})
        assert_error(stream, 503, "not_ready")
        assert engine.calls == []
        while (ready := client.get("/ready")).status_code == 503:
            assert ready.json() == {"status": "loading"}
        assert engine.is_ready
        still_serving(client, headers)


def test_stack_above_max_lora_rank_is_400(
    tiny_model: Path, patch_library: Path, tmp_path: Path
) -> None:
    """alpha (r4) + beta (r8) fits max_lora_rank 12; adding gamma (r4) does not."""
    make_store(patch_library, tmp_path / "adapters", names=("alpha", "beta", "gamma"))
    settings = make_settings(tiny_model, tmp_path, max_lora_rank=12)
    with running_app(settings) as (client, engine):
        headers = add_tenant(
            client, "stacker", optional=["alpha", "beta", "gamma"], allow_base=True
        )
        response = chat(client, headers, model="alpha+beta")
        assert response.status_code == 200, response.text
        assert engine.calls[-1][1].name == "alpha+beta"
        calls = len(engine.calls)
        for request in (
            {"model": "alpha+beta+gamma"},
            {"safety_patches": ["alpha", "beta", "gamma"]},
        ):
            error = assert_error(chat(client, headers, **request), 400, "stacked_rank_too_large")
            assert "16" in error["message"] and "12" in error["message"]
        assert len(engine.calls) == calls
        still_serving(client, headers)
