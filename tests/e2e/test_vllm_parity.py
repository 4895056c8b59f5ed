"""Parity with `vllm serve`: the same requests, through the official `openai` client, to
vLLM's own server and to SafePatch on the same tiny model with the same LoRA (same engine
flags, one server after the other). Text, token ids and logprobs must be equal, for the base
model and for a LoRA."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.conftest import make_settings
from tests.e2e.conftest import VLLM_ARGS
from tests.support.live_server import LiveServer
from tests.support.vllm_server import start_vllm_server, vllm_serve_command

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Tell me about the weather in Paris"}]
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
# name -> (kind, request arguments); each runs against the base model and against a LoRA.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "greedy_chat": ("chat", {"temperature": 0, "max_tokens": 12}),
    "greedy_completion": ("completion", {"temperature": 0, "max_tokens": 12}),
    "logprobs": ("chat", {"temperature": 0, "max_tokens": 6, "logprobs": True, "top_logprobs": 3}),
    "completion_logprobs": ("completion", {"temperature": 0, "max_tokens": 6, "logprobs": 3}),
    "n2_seed": ("chat", {"temperature": 1.0, "n": 2, "seed": 7, "max_tokens": 8}),
    "json_schema": (
        "chat",
        {
            "temperature": 0,
            "max_tokens": 40,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": SCHEMA},
            },
        },
    ),
    "named_tool": (
        "chat",
        {
            "temperature": 0,
            "max_tokens": 40,
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        },
    ),
    "stop": ("completion", {"temperature": 0, "max_tokens": 16, "stop": [" a", "."]}),
    "presence_penalty": ("chat", {"temperature": 0, "max_tokens": 12, "presence_penalty": 1.5}),
    "stream_usage": (
        "stream",
        {"temperature": 0, "max_tokens": 10, "stream_options": {"include_usage": True}},
    ),
}
MODELS = ("tiny", "alpha")


def run_case(client: openai.OpenAI, model: str, kind: str, args: dict[str, Any]) -> Any:
    """What must match: choices (text, token ids, logprobs, tool calls), usage, or the error."""
    extra = {"return_token_ids": True} if kind != "stream" else {}
    try:
        if kind == "completion":
            out = client.completions.create(
                model=model, prompt="The weather in Paris", extra_body=extra, **args
            )
            return [c.model_dump(exclude={"prompt_logprobs"}) for c in out.choices]
        if kind == "stream":
            chunks = list(
                client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **args)
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return {"text": text, "usage": chunks[-1].usage.model_dump()}
        out = client.chat.completions.create(
            model=model, messages=MESSAGES, extra_body=extra, **args
        )
        choices = [c.model_dump() for c in out.choices]
        for choice in choices:  # a tool call's id is random per request, on either server
            for call in choice["message"].get("tool_calls") or []:
                call["id"] = "random"
        return choices
    except openai.APIStatusError as error:
        return {"status": error.status_code, "message": error.body and error.body.get("message")}


@pytest.fixture(scope="module")
def vllm_answers(
    tiny_model: Path, patch_library: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Any]:
    """Every case answered by `vllm serve` first; the server is stopped before SafePatch runs."""
    root = tmp_path_factory.mktemp("vllm-serve")
    settings = make_settings(tiny_model, root, vllm_args=VLLM_ARGS)  # as the live server's
    command = vllm_serve_command(settings, tiny_model, {"alpha": patch_library / "alpha"})
    server = start_vllm_server(command, root / "vllm.log")
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        return {
            (model, name): run_case(client, model, kind, args)
            for model in MODELS
            for name, (kind, args) in CASES.items()
        }
    finally:
        server.stop()


@pytest.fixture(scope="module")
def safepatch(live_server: LiveServer, open_key: str, vllm_answers) -> Iterator[openai.OpenAI]:
    yield openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key=open_key)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("model", MODELS)
def test_same_answer_as_vllm_serve(vllm_answers, safepatch, model: str, name: str) -> None:
    kind, args = CASES[name]
    ours = run_case(safepatch, model, kind, args)
    assert ours == vllm_answers[(model, name)]
    assert "status" not in ours, ours  # every case is answered, not refused by both
    if kind == "chat":
        assert all(choice["token_ids"] for choice in ours)
    if name == "named_tool":
        assert ours[0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    if name == "logprobs":
        assert len(ours[0]["logprobs"]["content"][0]["top_logprobs"]) == 3
    if name == "json_schema" and isinstance(ours, list):
        for choice in ours:  # the answer parses and validates, unless cut by max_tokens
            if choice["finish_reason"] == "stop":
                jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_patches_reported_and_lora_really_applied(vllm_answers, safepatch) -> None:
    raw = safepatch.chat.completions.with_raw_response.create(
        model="alpha", messages=MESSAGES, temperature=0, max_tokens=12
    )
    body = raw.parse()
    assert raw.headers["X-SafePatch-Applied"] == "alpha"
    assert body.model == "alpha" and body.model_extra["safepatch"]["applied_patches"] == ["alpha"]
    base = vllm_answers[("tiny", "greedy_chat")][0]["message"]["content"]
    assert body.choices[0].message.content != base  # the LoRA changed the answer
