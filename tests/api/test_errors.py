"""Every failure is the OpenAI error body {"error": {message, type, param, code}} with the
right status, and the server keeps answering after each one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import BASE, NO_SCORING, add_tenant, assert_error, chat, running_app
from tests.conftest import make_settings, make_store
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


def post(client: TestClient, headers: dict[str, str], path: str, body: object) -> httpx.Response:
    return client.post(path, json=body, headers=headers)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("raw", [b'{"model": "tiny", "messages": [', b"not json", b"{'a': 1}"])
def test_malformed_json_is_400_invalid_json(served: Client, path: str, raw: bytes) -> None:
    client, headers = served
    response = client.post(
        path, content=raw, headers={**headers, "Content-Type": "application/json"}
    )
    error = assert_error(response, 400, "invalid_json")
    assert error["type"] == "invalid_request_error"
    still_serving(client, headers)


CHAT = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "temperature": 5}, "temperature"),
        ({**CHAT, "temperature": -0.1}, "temperature"),
        ({**CHAT, "top_p": 0}, "top_p"),
        ({**CHAT, "top_p": 1.5}, "top_p"),
        ({**CHAT, "n": 2}, "n"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": "many"}, "max_tokens"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**CHAT, "seed": 2**64}, "seed"),
        ({"model": BASE}, "messages"),
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": CHAT["messages"]}, "model"),
        ({**CHAT, "model": ""}, "model"),
    ],
)
def test_invalid_chat_parameters_are_422(served: Client, body: dict, param: str) -> None:
    client, headers = served
    error = assert_error(
        post(client, headers, "/v1/chat/completions", body), 422, "invalid_parameter"
    )
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"]
    still_serving(client, headers)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": BASE}, "prompt"),
        ({"model": BASE, "prompt": "hi", "temperature": 5}, "temperature"),
        ({"model": BASE, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_invalid_completion_parameters_are_422(served: Client, body: dict, param: str) -> None:
    client, headers = served
    error = assert_error(post(client, headers, "/v1/completions", body), 422, "invalid_parameter")
    assert error["param"] == param
    still_serving(client, headers)


def test_out_of_vocabulary_token_ids_are_400(served: Client) -> None:
    client, headers = served
    response = post(
        client,
        headers,
        "/v1/completions",
        {"model": BASE, "prompt": [1, 2, 10**9], "max_tokens": 2},
    )
    error = assert_error(response, 400, "invalid_token_id")
    assert error["param"] == "prompt"
    still_serving(client, headers)


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


@pytest.mark.parametrize(
    ("messages", "max_tokens", "param"),
    [
        ("word " * 400, None, "messages"),  # the prompt alone is longer than max_model_len 256
        ("word " * 400, 4, "max_tokens"),
        ("hi", 10_000, "max_tokens"),  # prompt fits, prompt + max_tokens does not
    ],
)
def test_prompt_longer_than_context_is_400(
    served: Client, messages: str, max_tokens: int | None, param: str
) -> None:
    client, headers = served
    body = {**CHAT, "messages": [{"role": "user", "content": messages}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    error = assert_error(
        post(client, headers, "/v1/chat/completions", body), 400, "context_length_exceeded"
    )
    assert error["param"] == param
    assert "256" in error["message"]
    still_serving(client, headers)


def test_long_completion_prompt_is_400(served: Client) -> None:
    client, headers = served
    response = post(
        client,
        headers,
        "/v1/completions",
        {"model": BASE, "prompt": "word " * 400, "max_tokens": 1},
    )
    assert_error(response, 400, "context_length_exceeded")
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
        assert engine.calls[-1][2].name == "alpha+beta"
        calls = len(engine.calls)
        for request in (
            {"model": "alpha+beta+gamma"},
            {"safety_patches": ["alpha", "beta", "gamma"]},
        ):
            error = assert_error(chat(client, headers, **request), 400, "stacked_rank_too_large")
            assert "16" in error["message"] and "12" in error["message"]
        assert len(engine.calls) == calls
        still_serving(client, headers)
