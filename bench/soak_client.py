"""The soak's HTTP side (bench/soak.py): tenants, greedy answers (streamed, cancelled), the
churn cycle, and what is left behind once the load stops."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.observability.metrics import series_total

PROMPTS = [
    "Write one sentence about the sea.",
    "How do I bake bread?",
    "List three prime numbers.",
    "What is a safety patch?",
]
SETTLE_S = 20.0  # after the load: how long leases and engine requests may take to end


@dataclass(frozen=True)
class Lane:
    """Requests of one tenant with one patch set (what a solo answer is taken for)."""

    tenant: str
    patches: list[str]

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        return self.tenant, tuple(self.patches)


@dataclass
class Answer:
    text: str
    gates: dict[str, str]
    cancelled: bool = False


@dataclass
class Tally:
    requests: Counter[str] = field(default_factory=Counter)  # kind -> count
    gates: Counter[str] = field(default_factory=Counter)  # "patch=fired|passed" -> count
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    checked: int = 0
    cancelled: int = 0
    churn_cycles: int = 0
    timeline: list[dict[str, float]] = field(default_factory=list)

    def sample(self, t: float, rss: int, rss_main: int = 0) -> None:
        self.timeline.append(
            {
                "t_s": round(t, 1),
                "rss_mib": round(rss / 1024, 1),
                "rss_main_mib": round(rss_main / 1024, 1),  # the server process alone
                "requests": sum(self.requests.values()),
                "errors": len(self.errors),
            }
        )


def rss_kib(pid: int, tree: bool = True) -> int:
    """Resident memory of `pid` and (`tree`) all its descendants: vLLM's engine core is a
    child, started from a worker thread (so listed in that thread's `children`, not the main
    thread's)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        if not tree:
            break
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in children.read_text().split()]
    return total


def read_adapter(directory: Path) -> dict[str, bytes]:
    names = ("adapter_config.json", "adapter_model.safetensors")
    return {name: (directory / name).read_bytes() for name in names}


def gate_metadata(name: str, files: dict[str, bytes], openings: list[str]) -> bytes:
    """`safepatch.json` gating a patch by default, firing on probes that open with `openings`."""
    config = json.loads(files["adapter_config.json"])
    meta = {
        "name": name,
        "rank": config["r"],
        "target_modules": config["target_modules"],
        "weights_sha256": hashlib.sha256(files["adapter_model.safetensors"]).hexdigest(),
        "gate": {"mode": "gated", "openings": openings, "calibration": "soak prompts"},
    }
    return json.dumps(meta).encode()


class SoakClient:
    def __init__(self, http: httpx.AsyncClient, admin_token: str, max_tokens: int) -> None:
        self.http = http
        self.admin_headers = {"Authorization": f"Bearer {admin_token}"}
        self.max_tokens = max_tokens
        self.keys: dict[str, str] = {}
        self.model = ""

    async def admin(self, method: str, path: str, expect: int, **kwargs: Any) -> httpx.Response:
        response = await self.http.request(method, path, headers=self.admin_headers, **kwargs)
        if response.status_code != expect:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:200]}")
        return response

    async def tenant(self, tenant_id: str, policy: dict[str, Any]) -> None:
        """Create (or reset) a tenant with `policy`; keep a fresh key for it."""
        found = await self.http.get(f"/admin/tenants/{tenant_id}", headers=self.admin_headers)
        if found.status_code == 404:
            await self.admin(
                "POST", "/admin/tenants", 201, json={"id": tenant_id, "policy": policy}
            )
        else:
            await self.admin("PUT", f"/admin/tenants/{tenant_id}/policy", 200, json=policy)
        created = await self.admin("POST", f"/admin/tenants/{tenant_id}/keys", 201)
        self.keys[tenant_id] = created.json()["key"]
        if not self.model:
            headers = {"Authorization": f"Bearer {self.keys[tenant_id]}"}
            self.model = (await self.http.get("/v1/models", headers=headers)).json()["data"][0][
                "id"
            ]

    async def register_upload(self, name: str, files: dict[str, bytes], exist_ok: bool = False):
        parts = {f"f{i}": (filename, data) for i, (filename, data) in enumerate(files.items())}
        response = await self.http.post(
            "/admin/adapters", headers=self.admin_headers, data={"name": name}, files=parts
        )
        if response.status_code != 201 and not (exist_ok and response.status_code == 409):
            raise RuntimeError(f"upload {name}: {response.status_code} {response.text[:200]}")

    async def adapter_names(self) -> list[str]:
        listed = await self.admin("GET", "/admin/adapters", 200)
        return [a["name"] for a in listed.json()["data"]]

    async def answer(
        self,
        lane: Lane,
        prompt: str,
        max_tokens: int,
        stream: bool,
        cancel_after: int | None = None,
        rng: random.Random | None = None,
        started: asyncio.Event | None = None,
    ) -> Answer:
        """The greedy answer; `cancel_after`: a stream is dropped after that many events, a
        JSON request after a random client timeout (cancelled: unless it had finished)."""
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": stream,
            "safety_patches": lane.patches,
        }
        headers = {"Authorization": f"Bearer {self.keys[lane.tenant]}"}
        if stream:
            return await self._stream(request, headers, cancel_after, started)
        if cancel_after is None:
            return await self._json(request, headers)
        try:
            wait = (rng or random).uniform(0.02, 0.6)
            return await asyncio.wait_for(self._json(request, headers), wait)
        except TimeoutError:
            return Answer("", {}, cancelled=True)

    async def _json(self, request: dict[str, Any], headers: dict[str, str]) -> Answer:
        response = await self.http.post("/v1/chat/completions", json=request, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
        out = response.json()
        gates = (out.get("safepatch") or {}).get("gates") or {}
        return Answer(out["choices"][0]["message"]["content"], gates)

    async def _stream(
        self,
        request: dict[str, Any],
        headers: dict[str, str],
        cancel_after: int | None,
        started: asyncio.Event | None,
    ) -> Answer:
        parts: list[str] = []
        gates: dict[str, str] = {}
        async with self.http.stream(
            "POST", "/v1/chat/completions", json=request, headers=headers
        ) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]!r}")
            events = 0
            async for line in response.aiter_lines():
                if cancel_after is not None and events >= cancel_after:
                    return Answer("", gates, cancelled=True)  # leaving closes the connection
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    raise RuntimeError(f"stream error event: {event['error']}")
                events += 1
                if started is not None:
                    started.set()
                gates = gates or (event.get("safepatch") or {}).get("gates") or {}
                parts.append(event["choices"][0]["delta"].get("content") or "")
        return Answer("".join(parts), gates)

    async def churn_cycle(
        self,
        name: str,
        source: str,
        partner: str | None,
        upload: dict[str, bytes] | None,
        args: argparse.Namespace,
        solo: dict[tuple[Any, str], str],
        tally: Tally,
    ) -> None:
        """Register `name` (a copy of `source`), stream through it alone and stacked, delete it
        while the streams are in flight; their answers must be `source`'s."""
        if upload is not None:
            await self.register_upload(name, upload)
        else:
            await self.admin("POST", "/admin/adapters", 201, json={"name": name, "path": source})
        base_policy = {"optional": sorted(args.patches), "allow_base": True}
        policy = {**base_policy, "optional": sorted([*args.patches, name])}
        await self.admin("PUT", "/admin/tenants/soak-churn/policy", 200, json=policy)
        prompt = PROMPTS[tally.churn_cycles % len(PROMPTS)]
        stacks = [[name]] + ([sorted([name, partner])] if partner else [])
        events = [asyncio.Event() for _ in stacks]

        async def run(patches: list[str], started: asyncio.Event) -> Answer:
            try:
                lane = Lane("soak-churn", patches)
                return await self.answer(lane, prompt, args.max_tokens, True, started=started)
            finally:
                started.set()

        tasks = [asyncio.create_task(run(s, e)) for s, e in zip(stacks, events, strict=True)]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), args.timeout)
            await self.admin("PUT", "/admin/tenants/soak-churn/policy", 200, json=base_policy)
            await self.admin("DELETE", f"/admin/adapters/{name}", 204)
        finally:
            answers = await asyncio.gather(*tasks)
        for patches, answer in zip(stacks, answers, strict=True):
            original = tuple(sorted(source if p == name else p for p in patches))
            if answer.text != solo[(("soak-open", original), prompt)]:
                tally.mismatches.append(f"churn {'+'.join(patches)}: {answer.text!r}")
            else:
                tally.checked += 1

    async def settle(self) -> dict[str, float | None]:
        """Once the load stopped: leases and engine requests still there after SETTLE_S."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            text = (await self.http.get("/metrics")).text
            left = {
                "leases": series_total(text, "safepatch_lora_leases"),
                "engine_requests": series_total(text, "safepatch_engine_requests"),
                "engine_running": series_total(text, "vllm:num_requests_running"),
                "engine_waiting": series_total(text, "vllm:num_requests_waiting"),
            }
            if not any(left.values()) or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.5)
