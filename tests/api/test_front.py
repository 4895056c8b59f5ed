"""SafePatch in front of the engine's OpenAI app: any OpenAI client in dev mode, the client's
`model` and the applied patches in every answer and stream chunk, leases for the whole
answer, and the engine's work cancelled when a client leaves."""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest

from app.config import Settings
from tests.api.conftest import NO_SCORING
from tests.conftest import make_settings
from tests.support.api_client import BASE, add_tenant, chat
from tests.support.apps import running_app
from tests.support.fake_engine import FakeEngine

pytestmark = NO_SCORING


def client_for(http, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=api_key, http_client=http)


def chat_text(client: openai.OpenAI, **kwargs) -> str:
    response = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2, **kwargs
    )
    return response.choices[0].message.content


@pytest.mark.parametrize("dev_mode", [True, False])
def test_openai_client_with_any_key_in_dev_mode_only(
    tiny_model: Path, store: Path, tmp_path: Path, dev_mode: bool
) -> None:
    settings = make_settings(tiny_model, tmp_path, dev_mode=dev_mode, default_patches=["alpha"])
    with running_app(settings) as (http, _):
        key = add_tenant(http, "acme", allow_base=True)["Authorization"][7:]
        assert chat_text(client_for(http, key)) == "base:0 base:1 "  # a tenant key: its policy
        if dev_mode:  # any other key is the dev tenant, with its default patch gated
            assert chat_text(client_for(http, "sk-anything")) == "base:0 base:1 "
            harmful = [{"role": "user", "content": "[refuse] harm"}]
            body = chat(http, {"Authorization": "Bearer sk-x"}, messages=harmful).json()
            assert body["safepatch"] == {"applied_patches": ["alpha"], "gates": {"alpha": "fired"}}
        else:
            with pytest.raises(openai.AuthenticationError):
                chat_text(client_for(http, "sk-anything"))


def test_every_stream_chunk_names_the_clients_model_and_the_patches(settings: Settings) -> None:
    with running_app(settings) as (http, engine):
        headers = add_tenant(http, "s", default=["alpha"], allow_base=True)
        body = {
            "model": BASE,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        response = http.post("/v1/chat/completions", json=body, headers=headers)
        assert response.headers["X-SafePatch-Applied"] == "alpha"
        events = [e for e in response.text.split("\n\n") if e.startswith("data: {")]
        chunks = [json.loads(e[6:]) for e in events]
        assert len(chunks) == 4  # three tokens and the usage chunk
        for chunk in chunks:
            assert chunk["model"] == BASE
            assert chunk["safepatch"] == {"applied_patches": ["alpha"], "gates": {}}
        assert engine.calls[-1][0]["model"] != BASE  # the engine was asked for the LoRA
        assert "safety_patches" not in engine.calls[-1][0]


def test_a_client_leaving_mid_stream_cancels_the_engine_work_and_ends_the_lease(
    settings: Settings,
) -> None:
    engine = FakeEngine(token_delay=0.05)
    with running_app(settings, engine) as (http, _):
        headers = add_tenant(http, "gone", optional=["alpha"])
        body = {"model": "alpha", "prompt": "hi", "max_tokens": 200, "stream": True}
        with http.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        targets = http.app.state.safepatch.registry.targets
        deadline = time.monotonic() + 10
        while engine.cancelled != ["alpha"] or targets.leases_held():
            assert time.monotonic() < deadline, (engine.cancelled, targets.leases_held())
            time.sleep(0.02)


def test_openapi_documents_the_engines_request_bodies(settings: Settings) -> None:
    with running_app(settings) as (http, _):
        paths = http.get("/openapi.json").json()["paths"]
        # the engine's own operation (vLLM's carries its request-body schema)
        assert paths["/v1/chat/completions"]["post"]["operationId"].startswith("generate_")
        assert "/admin/adapters" in paths


def test_each_patch_record_is_read_once_per_request(settings: Settings) -> None:
    """The ServedCall dependency resolves caller -> policy -> patch set -> the one LoRA and the
    gate rules from one read of each patch's record."""
    with running_app(settings) as (http, _):
        headers = add_tenant(
            http, "r", default=["alpha"], optional=["beta"], modes={"alpha": "gated"}
        )
        registry = http.app.state.safepatch.registry  # type: ignore[attr-defined]
        reads: list[str] = []
        find = registry.find  # every read of a record goes through it (`get` included)

        def counted(name: str):
            reads.append(name)
            return find(name)

        registry.find = counted
        response = chat(http, headers, model="beta", safety_patches=["beta"])
        assert response.json()["safepatch"]["gates"] == {"alpha": "passed"}
        assert sorted(reads) == ["alpha", "beta"]
