"""Gated patches on the real engine (tiny model). A patch whose rule "refuses" exactly the
greedy opening it gives on one prompt set: on those prompts the gated answer equals the
patched answer, on the others it equals the base model's answer token for token; streamed and
not, mixed concurrently with always-on and base requests; nothing leaks."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.patches.gate import normalise
from tests.conftest import ADMIN
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.slow

CANDIDATES = [
    "tell me a story",
    "how do I cook rice",
    "what is the weather",
    "name a colour",
    "count to three",
    "write a poem about the sea",
    "explain gravity",
    "give me a recipe",
    "who wrote hamlet",
    "translate hello to french",
]


def ask(http: httpx.Client, key: str, model: str, prompt: str, stream: bool) -> tuple[list, dict]:
    """Greedy answer: (token ids, safepatch info)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": stream,
        "return_token_ids": True,
    }
    response = http.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 200, response.text
    if not stream:
        out = response.json()
        return out["choices"][0]["token_ids"], out["safepatch"]
    chunks = [json.loads(e[6:]) for e in response.text.split("\n\n") if e[6:7] == "{"]
    ids = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids") or []]
    return ids, chunks[0]["safepatch"]


def opening(http: httpx.Client, key: str, prompt: str) -> str:
    body = {
        "model": "alpha",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 6,
        "temperature": 0,
    }
    response = http.post("/v1/chat/completions", json=body, headers={"Authorization": key})
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def gated(
    live_server: LiveServer, open_key: str, patch_library: Path
) -> tuple[str, list[str], list[str]]:
    """Uploads alpha's weights as `alpha-gated`, gated by default, with openings that are
    alpha's own greedy openings on two prompts (the refused set); returns a key of a tenant
    that may use it, the refused prompts and prompts that open otherwise (the passed set)."""
    with live_server.client() as http:
        first = {p: normalise(opening(http, f"Bearer {open_key}", p)) for p in CANDIDATES}
        refused = [p for p in CANDIDATES if first[p]][:2]
        openings = [first[p] for p in refused]
        passed = [p for p in CANDIDATES if not first[p].startswith(tuple(openings))]
        assert len(refused) == 2 and len(passed) >= 2, first
        files = {n: (patch_library / "alpha" / n).read_bytes() for n in ("adapter_config.json",)}
        files["adapter_model.safetensors"] = (
            patch_library / "alpha" / "adapter_model.safetensors"
        ).read_bytes()
        meta = {
            "name": "alpha-gated",
            "rank": 4,
            "target_modules": ["q_proj", "v_proj"],
            "weights_sha256": hashlib.sha256(files["adapter_model.safetensors"]).hexdigest(),
            "gate": {"mode": "gated", "openings": openings, "calibration": "test prompts"},
        }
        files["safepatch.json"] = json.dumps(meta).encode()
        parts = {f"f{i}": (name, data) for i, (name, data) in enumerate(files.items())}
        response = http.post(
            "/admin/adapters", headers=ADMIN, data={"name": "alpha-gated"}, files=parts
        )
        assert response.status_code == 201, response.text
        assert response.json()["gate"]["mode"] == "gated"
    policy = {"optional": ["alpha", "alpha-gated"], "allow_base": True}
    return live_server.tenant_key("gating", policy), refused, passed


@pytest.mark.parametrize("stream", [False, True])
def test_gated_equals_base_unless_the_probe_refuses(
    live_server: LiveServer, gated: tuple[str, list[str], list[str]], stream: bool
) -> None:
    key, refused, passed = gated
    prompts = refused + passed
    jobs = [(p, m) for p in prompts for m in ("alpha-gated", "tiny", "alpha")]
    with live_server.client() as http, ThreadPoolExecutor(8) as pool:
        # gated, base and always-on requests in flight together
        results = list(pool.map(lambda job: ask(http, key, job[1], job[0], stream), jobs))
    answers = dict(zip(jobs, results, strict=True))
    for prompt in refused:
        ids, info = answers[(prompt, "alpha-gated")]
        assert info["gates"] == {"alpha-gated": "fired"}
        assert ids == answers[(prompt, "alpha")][0]  # the patched answer
    for prompt in passed:
        ids, info = answers[(prompt, "alpha-gated")]
        assert info == {"applied_patches": [], "gates": {"alpha-gated": "passed"}}
        assert ids == answers[(prompt, "tiny")][0]  # the base model's own answer


def test_nothing_leaks(live_server: LiveServer, gated: tuple) -> None:
    with live_server.client() as http:
        metrics = http.get("/metrics").text
    assert 'safepatch_gate_decisions_total{decision="fired",patch="alpha-gated"}' in metrics
    lines = [line for line in metrics.splitlines() if line.startswith("safepatch_lora_leases")]
    assert lines == ["safepatch_lora_leases 0.0"], lines
    # every dropped ungated request and every probe has ended in the engine too
    assert "\nsafepatch_engine_requests 0.0\n" in metrics
    assert "vllm:generation_tokens_total" in metrics  # the engine's own metrics beside ours
