"""Registry benchmark on a real server: cold (just registered) vs warm first-token latency,
throughput with 1/4/8 distinct patches in the mix, and a 2-patch stack vs one patch.

    .venv/bin/python -m bench.registry [--model DIR] [--requests 16] [--output-len 32]

Adapters are synthetic rank-8 LoRAs on q/k/v/o (made with tests.support.lora_adapters). Prints a
table, writes bench/results/registry.json.
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

from app.config import Settings
from tests.conftest import ADMIN
from tests.support.live_server import start_server
from tests.support.lora_adapters import make_lora_adapter

ROOT = Path(__file__).resolve().parent
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


async def throughput(
    http: httpx.AsyncClient,
    key: str,
    models: list[str],
    requests: int,
    output_len: int,
    concurrency: int = 8,
) -> float:
    gate = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with gate:
            response = await http.post(
                "/v1/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={
                    "model": models[i % len(models)],
                    "prompt": "Tell me about the sea.",
                    "max_tokens": output_len,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    await asyncio.gather(*(one(i) for i in range(len(models))))  # warm every adapter
    tokens = 0
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return tokens / (time.perf_counter() - start)


async def first_token_s(http: httpx.AsyncClient, key: str, model: str) -> float:
    start = time.perf_counter()
    async with http.stream(
        "POST",
        "/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True},
    ) as response:
        response.raise_for_status()
        elapsed = None
        async for line in response.aiter_lines():
            if elapsed is None and line.startswith("data: {"):
                elapsed = time.perf_counter() - start
    if elapsed is None:
        raise RuntimeError("no tokens streamed")
    return elapsed


async def measure(server, store: Path, n_fresh: int, requests: int, output_len: int) -> dict:
    patches = [f"p{i}" for i in range(8)]
    fresh = [f"fresh{i}" for i in range(n_fresh)]
    key = server.tenant_key("bench", {"allow_base": True, "optional": patches})
    async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as http:
        cold, warm = [], []
        for name in fresh:
            (
                await http.post("/admin/adapters", headers=ADMIN, json={"name": name, "path": name})
            ).raise_for_status()
            fresh_key = server.tenant_key(f"t-{name}", {"optional": [name]})
            cold.append(await first_token_s(http, fresh_key, name))
            warm.append(
                statistics.median([await first_token_s(http, fresh_key, name) for _ in range(3)])
            )
        mix = {n: await throughput(http, key, patches[:n], requests, output_len) for n in (1, 4, 8)}
        single = await throughput(http, key, ["p0"], requests, output_len)
        stacked = await throughput(http, key, ["p0+p1"], requests, output_len)
    return {
        "cold_first_token_s": statistics.median(cold),
        "warm_first_token_s": statistics.median(warm),
        "cold_over_warm": statistics.median(cold) / statistics.median(warm),
        "tokens_per_s_by_distinct_patches": mix,
        "mix_ratio_vs_1": {n: v / mix[1] for n, v in mix.items()},
        "single_patch_tokens_per_s": single,
        "stacked2_tokens_per_s": stacked,
        "stacked2_over_single": stacked / single,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--fresh", type=int, default=3, help="patches registered cold")
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "registry.json")
    args = parser.parse_args()

    from app.model.default_model import resolve_model_dir

    settings = Settings(model=args.model)
    model_dir = resolve_model_dir(settings)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "adapters"
        for i in range(8):
            make_lora_adapter(
                model_dir,
                store / f"p{i}",
                r=8,
                alpha=16,
                target_modules=MODULES,
                seed=i,
                init_scale=0.01,
            )
        server = start_server(
            Path(tmp),
            model=model_dir,
            adapters=store,
            SAFEPATCH_MAX_LORAS=str(args.max_loras),
            SAFEPATCH_MAX_MODEL_LEN="512",
            SAFEPATCH_CACHE_DIR=str(settings.cache_dir),
        )
        try:
            for i in range(args.fresh):  # written after start-up: registered by the API
                make_lora_adapter(
                    model_dir,
                    store / f"fresh{i}",
                    r=8,
                    alpha=16,
                    target_modules=MODULES,
                    seed=100 + i,
                    init_scale=0.01,
                )
            result = asyncio.run(measure(server, store, args.fresh, args.requests, args.output_len))
        finally:
            server.stop()
    report = {
        "model": model_dir.name,
        "max_loras": args.max_loras,
        "requests": args.requests,
        "output_len": args.output_len,
        **result,
    }
    print(
        f"first token: cold {result['cold_first_token_s']:.3f} s, warm "
        f"{result['warm_first_token_s']:.3f} s (cold/warm {result['cold_over_warm']:.2f})"
    )
    print(f"{'distinct patches':>16} {'tok/s':>8} {'vs 1':>6}")
    for n, tps in result["tokens_per_s_by_distinct_patches"].items():
        print(f"{n:>16} {tps:>8.1f} {result['mix_ratio_vs_1'][n]:>6.2f}")
    print(
        f"2-patch stack vs single: {result['stacked2_tokens_per_s']:.1f} vs "
        f"{result['single_patch_tokens_per_s']:.1f} tok/s "
        f"(ratio {result['stacked2_over_single']:.2f})"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
