"""Soak a running SafePatch server: N concurrent mixed requests for a duration, with admin churn.

Requests: base, single patch, stacks of two; streamed or not; some streams cancelled after
their first event. Every greedy answer that ran to its end is compared with the solo answer
for the same prompt and patches (taken one at a time before the soak). Throughout, a churn
task registers a copy of a patch under a fresh name (from a path inside the store), sends one
request through it (its answer must equal the original patch's) and deletes it.

Reports errors, mismatches, leaked leases (the `safepatch_lora_leases` gauge, when the server
exposes it: 0 once the load stops) and the server's RSS (process tree) at start and end.
Prints a table, writes JSON.

    .venv/bin/python -m bench.soak --url http://127.0.0.1:8000 --admin-token TOKEN
        --pid SERVER_PID --patches alpha beta --churn-path alpha [--duration 600]
        [--concurrency 8] [--max-tokens 16] [--api-key KEY]   (no key: a dev-mode server)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent
PROMPTS = [
    "Write one sentence about the sea.",
    "How do I bake bread?",
    "List three prime numbers.",
    "What is a safety patch?",
]


@dataclass
class Tally:
    requests: Counter[str] = field(default_factory=Counter)  # kind -> count
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    cancelled: int = 0
    churn_cycles: int = 0


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` and all its descendants (vLLM's engine core is a child)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        status = Path(f"/proc/{current}/status")
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            todo += [int(c) for c in children]
    return total


def body(model: str, prompt: str, patches: list[str], max_tokens: int, stream: bool) -> dict:
    request: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
    }
    if patches:
        request["safety_patches"] = patches
    return request


async def ask(
    http: httpx.AsyncClient, request: dict, headers: dict[str, str], cancel: bool = False
) -> str | None:
    """The answer's text; None when cancelled on purpose. Raises on any error."""
    if not request["stream"]:
        response = await http.post("/v1/chat/completions", json=request, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
        return response.json()["choices"][0]["message"]["content"]
    parts: list[str] = []
    async with http.stream(
        "POST", "/v1/chat/completions", json=request, headers=headers
    ) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise RuntimeError(f"stream error event: {event['error']}")
            parts.append(event["choices"][0]["delta"].get("content") or "")
            if cancel:
                return None  # leaving the block closes the connection mid-stream
    return "".join(parts)


async def metric(http: httpx.AsyncClient, name: str) -> float | None:
    text = (await http.get("/metrics")).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values) if values else None


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    admin = {"Authorization": f"Bearer {args.admin_token}"}
    sets: list[list[str]] = [[]] + [[p] for p in args.patches]
    sets += [list(pair) for pair in itertools.combinations(sorted(args.patches), 2)]
    tally = Tally()
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout) as http:
        model = (await http.get("/v1/models", headers=headers)).json()["data"][0]["id"]
        solo = {
            (prompt, tuple(patches)): await ask(
                http, body(model, prompt, patches, args.max_tokens, False), headers
            )
            for prompt in PROMPTS
            for patches in sets
        }
        rss_start = rss_kib(args.pid) if args.pid else None
        deadline = time.monotonic() + args.duration

        async def worker() -> None:
            while time.monotonic() < deadline:
                prompt, patches = rng.choice(PROMPTS), rng.choice(sets)
                stream = rng.random() < 0.5
                cancel = stream and rng.random() < args.cancel_rate
                kind = f"{'+'.join(patches) or 'base'}/{'stream' if stream else 'json'}"
                tally.requests[kind] += 1
                request = body(model, prompt, patches, args.max_tokens, stream)
                try:
                    answer = await ask(http, request, headers, cancel)
                except Exception as exc:
                    tally.errors.append(f"{kind}: {exc}")
                    continue
                if answer is None:
                    tally.cancelled += 1
                elif answer != solo[(prompt, tuple(patches))]:
                    tally.mismatches.append(f"{kind} {prompt!r}: {answer!r}")

        async def churn() -> None:
            source = args.churn_path.rstrip("/").rsplit("/", 1)[-1]
            for i in itertools.count():
                if time.monotonic() >= deadline:
                    return
                name = f"soak-churn-{args.seed}-{i}"
                try:
                    created = await http.post(
                        "/admin/adapters",
                        headers=admin,
                        json={"name": name, "path": args.churn_path},
                    )
                    if created.status_code != 201:
                        raise RuntimeError(f"register {created.status_code}: {created.text[:200]}")
                    if source in args.patches:
                        prompt = rng.choice(PROMPTS)
                        request = body(model, prompt, [name], args.max_tokens, False)
                        answer = await ask(http, request, headers)
                        if answer != solo[(prompt, (source,))]:
                            tally.mismatches.append(f"churn {name}: {answer!r}")
                    deleted = await http.delete(f"/admin/adapters/{name}", headers=admin)
                    if deleted.status_code != 204:
                        raise RuntimeError(f"delete {deleted.status_code}: {deleted.text[:200]}")
                    tally.churn_cycles += 1
                except Exception as exc:
                    tally.errors.append(f"churn: {exc}")
                await asyncio.sleep(args.churn_interval)

        started = time.monotonic()
        await asyncio.gather(churn(), *(worker() for _ in range(args.concurrency)))
        wall = time.monotonic() - started
        await asyncio.sleep(1.0)  # let cancelled streams' leases end
        leases = await metric(http, "safepatch_lora_leases")
        rss_end = rss_kib(args.pid) if args.pid else None
    total = sum(tally.requests.values())
    return {
        "duration_s": round(wall, 1),
        "concurrency": args.concurrency,
        "requests": total,
        "requests_per_s": round(total / wall, 2),
        "by_kind": dict(sorted(tally.requests.items())),
        "cancelled": tally.cancelled,
        "churn_cycles": tally.churn_cycles,
        "errors": len(tally.errors),
        "mismatches": len(tally.mismatches),
        "leaked_leases": leases,  # None: the server exposes no lease gauge
        "rss_start_mib": round(rss_start / 1024, 1) if rss_start else None,
        "rss_end_mib": round(rss_end / 1024, 1) if rss_end else None,
        "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2)
        if rss_start and rss_end
        else None,
        "first_errors": tally.errors[:10],
        "first_mismatches": tally.mismatches[:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--admin-token", required=True)
    parser.add_argument("--api-key", default=None, help="tenant key (none: dev-mode server)")
    parser.add_argument("--pid", type=int, default=None, help="server pid, for RSS")
    parser.add_argument("--patches", nargs="+", default=["alpha", "beta"])
    parser.add_argument("--churn-path", default="alpha", help="adapter dir inside the store")
    parser.add_argument("--churn-interval", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cancel-rate", type=float, default=0.2, help="of streamed requests")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "soak.json")
    args = parser.parse_args()
    result = asyncio.run(soak(args))
    rows = [(k, v) for k, v in result.items() if not isinstance(v, dict | list)]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for line in result["first_errors"] + result["first_mismatches"]:
        print("  ", line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
