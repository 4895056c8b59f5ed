"""The official `openai` client against the real server (uvicorn + vLLM, tiny model)."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def client(live_server, open_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key=open_key)


def test_models_lists_base_and_patches(client) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "alpha", "beta", "gamma"}
    assert models["alpha"].parent == "tiny"


def test_chat_completion(client) -> None:
    response = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "how do I cook"}],
        max_tokens=8,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in {"length", "stop"}
    assert response.usage.completion_tokens <= 8
    assert (
        response.usage.total_tokens
        == response.usage.prompt_tokens + response.usage.completion_tokens
    )


def test_completion_with_patch_as_model(client) -> None:
    raw = client.completions.with_raw_response.create(
        model="alpha", prompt="the water", max_tokens=6, temperature=0
    )
    assert raw.headers["x-safepatch-applied"] == "alpha"
    response = raw.parse()
    assert response.choices[0].text
    assert response.usage.completion_tokens == 6


def test_streamed_chat_equals_non_streamed(client) -> None:
    messages = [{"role": "user", "content": "what is the capital of france"}]
    full = client.chat.completions.create(
        model="beta", messages=messages, max_tokens=10, temperature=0
    )
    stream = client.chat.completions.create(
        model="beta",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_stop_and_seeded_sampling(client) -> None:
    kwargs = dict(model="tiny", prompt="the water", max_tokens=12, temperature=1.0, seed=7)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    stop = first.split()[1] if len(first.split()) > 1 else first.strip()[:2]
    stopped = client.completions.create(**kwargs, stop=[stop]).choices[0]
    assert stop not in stopped.text and stopped.finish_reason == "stop"


def test_errors_through_client(client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="the " * 300, max_tokens=4)
    assert "context" in caught.value.body["message"]  # vLLM's own message, as `vllm serve`
