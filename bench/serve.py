"""HTTP path vs direct engine: same workload, one run, so the ratio is measured like for like.

Workload: greedy completions with a fixed prompt (token ids) and a fixed output length
(`ignore_eos`), at each concurrency. The HTTP path is a real `safepatch serve` process; the
direct path is `VllmEngine` in this process with the same settings. They run one after the
other (2 shared cores: never both at once). Prints a table, writes JSON.

    .venv/bin/python -m bench.serve [--model DIR] [--requests 16] [--prompt-len 128]
                                    [--output-len 64] [--concurrency 1 8] [--patch NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from app.config import REPO_ROOT, Settings
from app.engine.types import LoraTarget, SamplingSpec
from tests.support.live_server import start_server

ROOT = Path(__file__).resolve().parent


def summarize(latencies: list[float], tokens: int, wall: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(ordered),
        "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "wall_s": wall,
    }


async def run_http(
    base_url: str,
    key: str,
    model: str,
    prompt: list[int],
    output_len: int,
    requests: int,
    concurrency: int,
) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        async with gate:
            start = time.perf_counter()
            response = await http.post(
                "/v1/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": output_len,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:
        await one(http)  # warm-up (LoRA load, first-request costs)
        latencies.clear()
        tokens = 0
        start = time.perf_counter()
        await asyncio.gather(*(one(http) for _ in range(requests)))
        return summarize(latencies, tokens, time.perf_counter() - start)


async def run_direct(
    engine,
    prompt: list[int],
    output_len: int,
    requests: int,
    concurrency: int,
    lora: LoraTarget | None,
) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0
    sampling = SamplingSpec(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> None:
        nonlocal tokens
        async with gate:
            start = time.perf_counter()
            async for chunk in engine.generate(prompt, sampling, f"bench-{i}", lora):
                last = chunk
            latencies.append(time.perf_counter() - start)
            tokens += last.completion_tokens

    await one(-1)
    latencies.clear()
    tokens = 0
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return summarize(latencies, tokens, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: embedded SmolLM2)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2, help="alternating repeats per path")
    parser.add_argument("--patch", default=None, help="serve every request with this patch")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serve.json")
    args = parser.parse_args()

    from app.main import resolve_model_dir

    settings = Settings(model=args.model, max_model_len=args.prompt_len + args.output_len + 8)
    model_dir = resolve_model_dir(settings)
    prompt = [(7 * i + 11) % 1000 + 10 for i in range(args.prompt_len)]
    adapters = REPO_ROOT / "adapters"
    rows: list[dict] = []

    async def measure(server) -> None:
        """Both paths loaded at once; runs alternate (http, direct) per round so machine
        noise hits both alike."""
        from app.engine.vllm_engine import VllmEngine

        key = server.tenant_key(
            "bench", {"allow_base": True, "optional": [args.patch] if args.patch else []}
        )
        model = args.patch or model_dir.name
        engine = VllmEngine(settings, model_dir)
        await engine.start()
        lora = LoraTarget(args.patch, 1, adapters / args.patch) if args.patch else None
        try:
            for c in args.concurrency:
                for round_ in range(args.rounds):
                    rows.append(
                        {
                            "path": "http",
                            "concurrency": c,
                            "round": round_,
                            **await run_http(
                                server.base_url,
                                key,
                                model,
                                prompt,
                                args.output_len,
                                args.requests,
                                c,
                            ),
                        }
                    )
                    rows.append(
                        {
                            "path": "direct",
                            "concurrency": c,
                            "round": round_,
                            **await run_direct(
                                engine, prompt, args.output_len, args.requests, c, lora
                            ),
                        }
                    )
        finally:
            await engine.shutdown()

    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(
            Path(tmp),
            model=model_dir,
            adapters=adapters,
            SAFEPATCH_MAX_MODEL_LEN=str(settings.max_model_len),
            SAFEPATCH_CACHE_DIR=str(settings.cache_dir),
        )
        try:
            asyncio.run(measure(server))
        finally:
            server.stop()

    report = {
        "model": model_dir.name,
        "patch": args.patch,
        "requests": args.requests,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "rows": rows,
        "ratio_http_over_direct": {},
    }
    print(f"{'path':8} {'conc':>4} {'round':>5} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7}")
    for row in rows:
        print(
            f"{row['path']:8} {row['concurrency']:>4} {row['round']:>5} "
            f"{row['tokens_per_s']:>8.1f} {row['p50_s']:>7.2f} {row['p95_s']:>7.2f}"
        )
    for c in args.concurrency:
        http_tps, direct_tps = (
            sum(r["tokens_per_s"] for r in rows if r["path"] == p and r["concurrency"] == c)
            for p in ("http", "direct")
        )
        ratio = http_tps / direct_tps  # summed over the alternating rounds
        report["ratio_http_over_direct"][str(c)] = ratio
        print(f"concurrency {c}: HTTP/direct throughput = {ratio:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
