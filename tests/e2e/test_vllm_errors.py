"""Request validation is vLLM's own: through SafePatch, bad requests get vLLM's 4xx in the
OpenAI error shape, nothing is generated, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.support.api_client import ERROR_FIELDS

pytestmark = pytest.mark.slow

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}


@pytest.fixture
def http(live_server, open_key) -> httpx.Client:
    with live_server.client(timeout=120) as client:
        client.headers["Authorization"] = f"Bearer {open_key}"
        yield client


def assert_vllm_error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert body["error"]["message"]
    return body["error"]


def still_serving(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("raw", [b'{"model": "tiny", "messages": [', b"not json", b"{'a': 1}"])
def test_malformed_json(http: httpx.Client, path: str, raw: bytes) -> None:
    response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert_vllm_error(response)
    still_serving(http)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "temperature": -0.1}),
        ("/v1/chat/completions", {**CHAT, "top_p": 1.5}),
        ("/v1/chat/completions", {**CHAT, "max_tokens": "many"}),
        ("/v1/chat/completions", {**CHAT, "n": 0}),
        ("/v1/chat/completions", {"model": "tiny"}),
        ("/v1/chat/completions", {**CHAT, "messages": "hi"}),
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 10_000}),
        ("/v1/completions", {**COMPLETION, "prompt": [[10**9]]}),  # out-of-vocabulary id
        ("/v1/completions", {**COMPLETION, "max_tokens": 10_000}),  # past the context
        ("/v1/completions", {**COMPLETION, "prompt": "word " * 400}),  # prompt > context
    ],
)
def test_invalid_parameters(http: httpx.Client, path: str, body: dict) -> None:
    assert_vllm_error(http.post(path, json=body))
    still_serving(http)
