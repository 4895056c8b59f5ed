"""Per-tenant patch policies: the effective set, what is refused, and what actually reaches
the engine."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import NO_SCORING
from tests.conftest import ADMIN
from tests.support.api_client import (
    BASE,
    applied,
    assert_error,
    chat,
    model_ids,
    new_tenant,
    served_lora,
    served_ok,
)

pytestmark = NO_SCORING


POLICY = {"mandatory": ["alpha"], "default": ["beta"], "optional": ["gamma"]}


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({}, ["alpha", "beta"]),
        ({"safety_patches": ["gamma"]}, ["alpha", "beta", "gamma"]),
        ({"safety_patches": ["-beta"]}, ["alpha"]),
        ({"safety_patches": ["-beta", "gamma"]}, ["alpha", "gamma"]),
        ({"safety_patches": ["+gamma", "alpha"]}, ["alpha", "beta", "gamma"]),
        ({"safety_patches": []}, ["alpha", "beta"]),
        ({"safety_patches": ["-gamma"]}, ["alpha", "beta"]),
        ({"headers": {"X-SafePatch-Patches": "-beta"}}, ["alpha"]),
        ({"headers": {"X-SafePatch-Patches": " gamma , -beta "}}, ["alpha", "gamma"]),
        (
            {"headers": {"X-SafePatch-Patches": "-beta"}, "safety_patches": ["gamma"]},
            ["alpha", "gamma"],
        ),
        ({"model": "gamma"}, ["alpha", "beta", "gamma"]),
        ({"model": "alpha"}, ["alpha", "beta"]),
        ({"model": "gamma+alpha"}, ["alpha", "beta", "gamma"]),
        ({"model": "gamma", "safety_patches": ["-beta"]}, ["alpha", "gamma"]),
    ],
)
def test_effective_set_is_what_reaches_the_engine(
    shared, request_: dict, expected: list[str]
) -> None:
    client, engine = shared
    _, key = new_tenant(client, **POLICY)
    request_ = dict(request_)
    headers = {**key, **request_.pop("headers", {})}
    assert served_ok(client, engine, headers, **request_) == expected


@pytest.mark.parametrize(
    "request_",
    [
        {"safety_patches": ["-alpha"]},
        {"safety_patches": ["gamma", "-alpha"]},
        {"headers": {"X-SafePatch-Patches": "-alpha"}},
        {"headers": {"X-SafePatch-Patches": "beta,-alpha"}},
        {"model": "beta", "safety_patches": ["-alpha"]},
    ],
)
def test_mandatory_patch_cannot_be_dropped(shared, request_: dict) -> None:
    client, engine = shared
    _, key = new_tenant(client, **POLICY)
    calls = len(engine.calls)
    request_ = dict(request_)
    headers = {**key, **request_.pop("headers", {})}
    error = assert_error(chat(client, headers, **request_), 403, "patch_mandatory")
    assert "alpha" in error["message"]
    assert error["type"] == "permission_error"
    assert len(engine.calls) == calls


@pytest.mark.parametrize(
    "request_",
    [
        {"safety_patches": ["gamma"]},
        {"headers": {"X-SafePatch-Patches": "gamma"}},
        {"model": "gamma"},
        {"model": "alpha+gamma"},
        {"model": "gamma+alpha"},
        {"model": "beta", "safety_patches": ["gamma"]},
    ],
)
def test_patch_only_another_tenant_may_use_is_403(shared, request_: dict) -> None:
    client, engine = shared
    _, tenant_a = new_tenant(client, mandatory=["alpha"], optional=["beta"])
    _, tenant_b = new_tenant(client, optional=["alpha", "beta", "gamma"], allow_base=True)
    calls = len(engine.calls)
    request_ = dict(request_)
    extra = request_.pop("headers", {})
    error = assert_error(chat(client, {**tenant_a, **extra}, **request_), 403, "patch_forbidden")
    assert "gamma" in error["message"]
    assert len(engine.calls) == calls
    assert "gamma" in served_ok(client, engine, {**tenant_b, **extra}, **request_)


def test_base_model_forbidden_unless_allowed(shared) -> None:
    client, engine = shared
    strict_id, strict = new_tenant(client, default=["beta"], optional=["gamma"])
    _, empty = new_tenant(client)
    calls = len(engine.calls)
    for headers, request_ in [
        (strict, {"safety_patches": ["-beta"]}),
        ({**strict, "X-SafePatch-Patches": "-beta"}, {}),
        (empty, {}),
        (empty, {"model": BASE}),
    ]:
        error = assert_error(chat(client, headers, **request_), 403, "base_model_forbidden")
        assert error["param"] == "model"
    completion = client.post("/v1/completions", headers=empty, json={"model": BASE, "prompt": "hi"})
    assert_error(completion, 403, "base_model_forbidden")
    assert len(engine.calls) == calls
    # with allow_base the same opt-out reaches the bare base model
    assert (
        client.put(
            f"/admin/tenants/{strict_id}/policy",
            headers=ADMIN,
            json={"default": ["beta"], "optional": ["gamma"], "allow_base": True},
        ).status_code
        == 200
    )
    assert served_ok(client, engine, strict, safety_patches=["-beta"]) == []


def test_conflicting_and_unknown_toggles(shared) -> None:
    client, engine = shared
    _, key = new_tenant(client, **POLICY)
    calls = len(engine.calls)
    assert_error(chat(client, key, safety_patches=["gamma", "-gamma"]), 400, "conflicting_toggles")
    assert_error(chat(client, key, safety_patches=["-"]), 400, "invalid_patch")
    assert_error(chat(client, key, safety_patches=["nope"]), 404, "patch_not_found")
    assert_error(chat(client, {**key, "X-SafePatch-Patches": "nope"}), 404, "patch_not_found")
    assert len(engine.calls) == calls


def test_applied_set_on_streams_and_completions(shared) -> None:
    client, engine = shared
    _, key = new_tenant(client, **POLICY)
    stream = chat(client, key, stream=True, safety_patches=["gamma"])
    assert stream.status_code == 200
    assert stream.headers["X-SafePatch-Applied"] == "alpha,beta,gamma"
    events = [
        line[len("data: ") :] for line in stream.text.splitlines() if line.startswith("data:")
    ]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert first["safepatch"]["applied_patches"] == ["alpha", "beta", "gamma"]
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "alpha+beta+gamma:0 alpha+beta+gamma:1 "
    assert served_lora(engine) == "alpha+beta+gamma"

    completion = client.post(
        "/v1/completions",
        headers={**key, "X-SafePatch-Patches": "-beta"},
        json={"model": BASE, "prompt": "hi", "max_tokens": 2},
    )
    assert completion.status_code == 200, completion.text
    assert applied(completion) == ["alpha"]
    assert completion.json()["choices"][0]["text"] == "alpha:0 alpha:1 "
    assert served_lora(engine) == "alpha"

    streamed = client.post(
        "/v1/completions",
        headers=key,
        json={"model": BASE, "prompt": "hi", "max_tokens": 2, "stream": True},
    )
    assert streamed.headers["X-SafePatch-Applied"] == "alpha,beta"
    events = [
        line[len("data: ") :] for line in streamed.text.splitlines() if line.startswith("data:")
    ]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["safepatch"]["applied_patches"] == ["alpha", "beta"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "alpha+beta:0 alpha+beta:1 "
    assert served_lora(engine) == "alpha+beta"


def test_policy_change_takes_effect_on_the_next_request(shared) -> None:
    client, engine = shared
    general, key = new_tenant(client, default=["alpha"], optional=["beta"])
    assert served_ok(client, engine, key) == ["alpha"]
    client.put(
        f"/admin/tenants/{general}/policy",
        headers=ADMIN,
        json={"mandatory": ["beta"], "optional": ["alpha"]},
    )
    assert served_ok(client, engine, key) == ["beta"]
    assert_error(chat(client, key, safety_patches=["-beta"]), 403, "patch_mandatory")
    assert served_ok(client, engine, key, safety_patches=["alpha"]) == ["alpha", "beta"]
    client.patch(
        f"/admin/tenants/{general}", headers=ADMIN, json={"policy": {"default": ["gamma"]}}
    )
    assert served_ok(client, engine, key) == ["gamma"]
    assert_error(chat(client, key, model="alpha"), 403, "patch_forbidden")


def test_models_show_a_tenant_only_what_it_may_use(shared) -> None:
    client, _ = shared
    strict_id, strict = new_tenant(client, mandatory=["alpha"], optional=["gamma"])
    _, open_ = new_tenant(client, default=["beta"], allow_base=True)
    assert model_ids(client, strict) == ["alpha", "gamma"]
    assert model_ids(client, open_) == [BASE, "beta"]
    cards = client.get("/v1/models", headers=strict).json()
    assert cards["object"] == "list"
    assert all(c["parent"] == BASE and c["object"] == "model" for c in cards["data"])
    client.put(f"/admin/tenants/{strict_id}/policy", headers=ADMIN, json={"allow_base": True})
    assert model_ids(client, strict) == [BASE]
