"""Soak a running SafePatch server: N concurrent mixed requests for a duration, with admin churn.

Requests, from tenants the soak sets up itself (`soak-open`, `soak-gated`, `soak-churn`):
base, single patches, stacks of two and three; gated (the `soak-gated` tenant's policy sets
`--gated` to mode "gated", and `--gate-upload` adds a copy of a patch whose own metadata gates
it with openings that fire on some prompts); streamed or not; some streams cancelled after 0-3
events and some JSON requests cancelled by a client timeout. Every greedy answer that ran to
its end is compared with the solo answer for the same tenant, prompt and patches (taken one
at a time before the soak). Throughout, a churn task registers a copy of a patch under a
fresh name (alternately by path and by upload), puts it in `soak-churn`'s policy, starts two
streams through it (alone, and stacked), deletes it while they are in flight and checks their
answers against the original patch's.

Reports requests, errors, mismatches, gate decisions, leaks once the load stops (the lease
gauge `safepatch_lora_leases`, `safepatch_engine_requests`, vLLM's `vllm:num_requests_running`
and `_waiting`, churn adapters left registered) and the server's RSS (process tree) at start
and end, sampled over time (`timeline`, plotted by bench/soak_plot.py). Prints a table, writes JSON.

    .venv/bin/python -m bench.soak --url http://127.0.0.1:8000 --admin-token TOKEN
        --pid SERVER_PID --patches alpha beta gamma --gated alpha --churn-path alpha
        [--churn-upload DIR] [--gate-upload DIR] [--duration 600] [--concurrency 12]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx

from bench.soak_client import (
    PROMPTS,
    Lane,
    SoakClient,
    Tally,
    gate_metadata,
    read_adapter,
    rss_kib,
)

ROOT = Path(__file__).resolve().parent
TENANTS = ("soak-open", "soak-gated", "soak-churn")


def rss_pair(pid: int | None) -> tuple[int, int]:
    """(process tree, server process alone) resident KiB; zeros without a pid."""
    return (rss_kib(pid), rss_kib(pid, tree=False)) if pid else (0, 0)


def lanes_for(args: argparse.Namespace, gate_name: str | None) -> list[Lane]:
    patches = sorted(args.patches)
    sets = [list(c) for k in range(len(patches) + 1) for c in itertools.combinations(patches, k)]
    lanes = [Lane("soak-open", s) for s in sets if len(s) <= 3]
    gated = [g for g in (args.gated, gate_name) if g]
    for g in gated:  # alone, and stacked with each patch (stacked with one, for the upload)
        partners = [p for p in patches if p != g][: None if g == args.gated else 1]
        lanes += [Lane("soak-gated", sorted([g, *o])) for o in ([], *[[p] for p in partners])]
    return lanes


async def setup(client: SoakClient, args: argparse.Namespace) -> str | None:
    """Tenants and keys; the self-gated upload (its name) when `--gate-upload` is given."""
    gate_name = None
    open_policy = {"optional": sorted(args.patches), "allow_base": True}
    await client.tenant("soak-open", open_policy)
    await client.tenant("soak-churn", open_policy)
    gated_policy: dict[str, Any] = {"optional": sorted(args.patches), "allow_base": True}
    if args.gated:
        gated_policy["modes"] = {args.gated: "gated"}
    if args.gate_upload:
        gate_name = f"{Path(args.gate_upload).name}-gate"
        source = Path(args.gate_upload).name
        openings: list[str] = []
        for prompt in PROMPTS:  # the source patch's own probe openings on two prompts: fired
            answer = await client.answer(Lane("soak-open", [source]), prompt, 6, stream=False)
            if answer.text.strip() and len(openings) < 2:
                openings.append(answer.text)
        files = read_adapter(Path(args.gate_upload))
        files["safepatch.json"] = gate_metadata(gate_name, files, openings)
        await client.register_upload(gate_name, files, exist_ok=True)
        gated_policy["optional"] = sorted([*args.patches, gate_name])
    await client.tenant("soak-gated", gated_policy)
    return gate_name


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    tally = Tally()
    rng = random.Random(args.seed)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout) as http:
        client = SoakClient(http, args.admin_token, args.max_tokens)
        gate_name = await setup(client, args)
        lanes = lanes_for(args, gate_name)
        solo = {
            (lane.key, prompt): (await client.answer(lane, prompt, args.max_tokens, False)).text
            for lane in lanes
            for prompt in PROMPTS
        }
        rss_start = rss_kib(args.pid) if args.pid else None
        started = time.monotonic()
        deadline = started + args.duration

        async def worker() -> None:
            while time.monotonic() < deadline:
                lane, prompt = rng.choice(lanes), rng.choice(PROMPTS)
                stream = rng.random() < 0.5
                cancel_after = rng.choice([0, 1, 3]) if rng.random() < args.cancel_rate else None
                kind = f"{lane.tenant.removeprefix('soak-')}:{'+'.join(lane.patches) or 'base'}"
                kind += "/stream" if stream else "/json"
                tally.requests[kind] += 1
                try:
                    answer = await client.answer(
                        lane, prompt, args.max_tokens, stream, cancel_after, rng
                    )
                except Exception as exc:
                    tally.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                    continue
                tally.gates.update(f"{p}={d}" for p, d in answer.gates.items())
                if answer.cancelled:
                    tally.cancelled += 1
                elif answer.text != solo[(lane.key, prompt)]:
                    tally.mismatches.append(f"{kind} {prompt!r}: {answer.text!r}")
                else:
                    tally.checked += 1

        async def churn() -> None:
            source = Path(args.churn_path).name
            partner = next((p for p in sorted(args.patches) if p != source), None)
            upload = read_adapter(Path(args.churn_upload)) if args.churn_upload else None
            for i in itertools.count():
                if time.monotonic() >= deadline:
                    return
                name = f"{source}-churn-{args.seed}-{i}"  # sorts where `source` does
                try:
                    by_upload = upload is not None and i % 2 == 1
                    await client.churn_cycle(
                        name, source, partner, upload if by_upload else None, args, solo, tally
                    )
                    tally.churn_cycles += 1
                except Exception as exc:
                    tally.errors.append(f"churn {name}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(args.churn_interval)

        async def sampler() -> None:
            while time.monotonic() < deadline:
                tally.sample(time.monotonic() - started, *rss_pair(args.pid))
                await asyncio.sleep(args.sample_interval)

        await asyncio.gather(sampler(), churn(), *(worker() for _ in range(args.concurrency)))
        wall = time.monotonic() - started
        leftovers = await client.settle()
        rss_end = rss_kib(args.pid) if args.pid else None
        tally.sample(time.monotonic() - started, *rss_pair(args.pid))
        prefix = f"{Path(args.churn_path).name}-churn-{args.seed}-"
        leftovers["churn_adapters"] = len(
            [n for n in await client.adapter_names() if n.startswith(prefix)]
        )
    total = sum(tally.requests.values())
    return {
        "duration_s": round(wall, 1),
        "concurrency": args.concurrency,
        "lanes": len(lanes),
        "requests": total,
        "requests_per_s": round(total / wall, 2),
        "checked_against_solo": tally.checked,
        "cancelled": tally.cancelled,
        "churn_cycles": tally.churn_cycles,
        "errors": len(tally.errors),
        "mismatches": len(tally.mismatches),
        "leaks": sum(v for v in leftovers.values() if v),
        "left_behind": leftovers,
        "gate_decisions": dict(sorted(tally.gates.items())),
        "rss_start_mib": round(rss_start / 1024, 1) if rss_start else None,
        "rss_end_mib": round(rss_end / 1024, 1) if rss_end else None,
        "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2)
        if rss_start and rss_end
        else None,
        "by_kind": dict(sorted(tally.requests.items())),
        "first_errors": tally.errors[:10],
        "first_mismatches": tally.mismatches[:10],
        "timeline": tally.timeline,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--admin-token", required=True)
    p.add_argument("--pid", type=int, default=None, help="server pid, for RSS")
    p.add_argument("--patches", nargs="+", default=["alpha", "beta", "gamma"])
    p.add_argument("--gated", default=None, help="a patch soak-gated's policy sets to gated")
    p.add_argument("--gate-upload", default=None, help="local adapter dir: a self-gated copy")
    p.add_argument("--churn-path", default="alpha", help="adapter dir inside the store")
    p.add_argument("--churn-upload", default=None, help="local copy of it: every other cycle")
    p.add_argument("--churn-interval", type=float, default=0.5)
    p.add_argument("--duration", type=float, default=600.0)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--cancel-rate", type=float, default=0.15)
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--sample-interval", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "soak.json")
    return p


def report(result: dict[str, Any], out: Path) -> None:
    rows = [(k, v) for k, v in result.items() if not isinstance(v, list) and k != "by_kind"]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for line in result["first_errors"] + result["first_mismatches"]:
        print("  ", line)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    args = parser().parse_args()
    report(asyncio.run(soak(args)), args.out)


if __name__ == "__main__":
    main()
