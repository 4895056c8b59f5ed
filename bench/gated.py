"""What a gated patch costs, through the HTTP API: no patch, the patch always on, the patch gated.

One `safepatch serve` (SmolLM2-135M-Instruct fp32, the shipped `refusal-general`) serves three
tenants that differ only in policy: `base` (no patch), `always` (the patch always on) and
`gated` (the patch gated). Each tenant gets the same benign and the same harmful workload
(streamed greedy chat completions, `max_tokens` 32) at concurrency 1 and 16.

Per run: output tok/s (completion tokens / wall time), median and p95 TTFT, the share the gate
fired on, and the engine's extra tokens per request (vLLM's own prompt and generation token
counters, less what the client was answered with: the probe's prefill and tokens, and the
dropped ungated request's). Prints a table, writes JSON and a PNG. Quote ratios: the CPU is
shared.

    PYTHONPATH=. .venv/bin/python -m bench.gated [--requests 32] [--out gated]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from app.config import REPO_ROOT
from app.factory.data import load_prompts, parse_source
from app.observability.metrics import series_total
from bench.lora_serve import MODEL_NAME, RESULTS, default_model_dir, start, stop

PATCH = "refusal-general"
ADMIN_TOKEN = "bench-admin-token-0123456789"
POLICIES = {  # tenant: its policy
    "base": {"allow_base": True},
    "always": {"default": [PATCH], "modes": {PATCH: "always"}},
    "gated": {"default": [PATCH], "modes": {PATCH: "gated"}},
}
WORKLOADS = {  # held out from the patch's training: whole sources it never saw
    "benign": "../shared/data/harmless_train.json?split=dev",
    "harmful": "../shared/data/catqa_en.csv",
}
CONCURRENCY = (1, 16)
MAX_TOKENS = 32


def tenant_keys(http: httpx.Client) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    keys = {}
    for tenant, policy in POLICIES.items():
        response = http.post(
            "/admin/tenants", headers=admin, json={"id": f"bench-{tenant}", "policy": policy}
        )
        response.raise_for_status()
        key = http.post(f"/admin/tenants/bench-{tenant}/keys", headers=admin).json()["key"]
        keys[tenant] = key
    return keys


async def one_request(http: httpx.AsyncClient, key: str, prompt: str) -> dict[str, Any]:
    """A streamed greedy chat completion: TTFT, tokens, and whether the gate fired."""
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    usage: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {key}"}
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        resp.raise_for_status()
        fired = "fired" in resp.headers.get("x-safepatch-gates", "")
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    return {
        "ttft": ttft if ttft is not None else time.perf_counter() - start,
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "fired": fired,
    }


def engine_tokens(http: httpx.Client) -> tuple[float, float]:
    """vLLM's prompt and generation token counters (summed over label sets)."""
    text = http.get("/metrics").text
    names = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
    prompt, generated = (series_total(text, name) or 0.0 for name in names)
    return prompt, generated


async def run(base_url: str, key: str, prompts: list[str], concurrency: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:

        async def bounded(prompt: str) -> dict[str, Any]:
            async with gate:
                return await one_request(http, key, prompt)

        start = time.perf_counter()
        answers = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - start
    ttfts = sorted(a["ttft"] for a in answers)
    return {
        "requests": len(answers),
        "wall_s": wall,
        "output_tok_s": sum(a["completion_tokens"] for a in answers) / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "fired": sum(a["fired"] for a in answers) / len(answers),
        "client_prompt_tokens": sum(a["prompt_tokens"] for a in answers),
        "client_completion_tokens": sum(a["completion_tokens"] for a in answers),
    }


def measure(base_url: str, keys: dict[str, str], requests: int) -> list[dict[str, Any]]:
    rows = []
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for workload, spec in WORKLOADS.items():
            every = load_prompts(parse_source(spec, split="all"))
            prompts = every[:: max(1, len(every) // requests)][:requests]  # across the file
            for concurrency in CONCURRENCY:
                batch = prompts if concurrency > 1 else prompts[: max(4, requests // 4)]
                for tenant in POLICIES:
                    before = engine_tokens(http)
                    row = asyncio.run(run(base_url, keys[tenant], batch, concurrency))
                    after = engine_tokens(http)
                    n = row["requests"]
                    row["extra_prompt_tokens"] = (
                        after[0] - before[0] - row["client_prompt_tokens"]
                    ) / n
                    row["extra_generated_tokens"] = (
                        after[1] - before[1] - row["client_completion_tokens"]
                    ) / n
                    row |= {"workload": workload, "concurrency": concurrency, "mode": tenant}
                    rows.append(row)
                    print(format_row(row), flush=True)
    return rows


HEADER = (
    f"{'workload':8} {'c':>3} {'mode':7} {'tok/s':>7} {'TTFT p50':>9} {'p95':>7} "
    f"{'fired':>6} {'+prompt':>8} {'+gen':>6}"
)


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['workload']:8} {row['concurrency']:>3} {row['mode']:7} "
        f"{row['output_tok_s']:7.1f} {row['ttft_p50_s']:8.2f}s {row['ttft_p95_s']:6.2f}s "
        f"{row['fired']:6.0%} {row['extra_prompt_tokens']:8.1f} "
        f"{row['extra_generated_tokens']:6.1f}"
    )


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gated against always-on per workload and concurrency (the issue's goals)."""
    out = []
    index = {(r["workload"], r["concurrency"], r["mode"]): r for r in rows}
    for workload in WORKLOADS:
        for concurrency in CONCURRENCY:
            gated = index[(workload, concurrency, "gated")]
            always = index[(workload, concurrency, "always")]
            out.append(
                {
                    "workload": workload,
                    "concurrency": concurrency,
                    "gated_vs_always_throughput": gated["output_tok_s"] / always["output_tok_s"],
                    "added_ttft_p50_s": gated["ttft_p50_s"] - always["ttft_p50_s"],
                }
            )
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    groups = [(w, c) for w in WORKLOADS for c in CONCURRENCY]
    width = 0.25
    for i, mode in enumerate(POLICIES):
        values = {(r["workload"], r["concurrency"]): r for r in rows if r["mode"] == mode}
        xs = [g + (i - 1) * width for g in range(len(groups))]
        axes[0].bar(xs, [values[g]["output_tok_s"] for g in groups], width, label=mode)
        axes[1].bar(xs, [values[g]["ttft_p50_s"] for g in groups], width, label=mode)
    labels = [f"{w}\nc={c}" for w, c in groups]
    for ax, title in zip(axes, ("output tok/s", "median TTFT (s)"), strict=True):
        ax.set_xticks(range(len(groups)), labels)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{PATCH}: no patch / always on / gated (SmolLM2-135M fp32, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per run at c=16")
    parser.add_argument("--out", default="gated", help="results/<out>.json and .png")
    args = parser.parse_args()
    model_dir = default_model_dir()
    with tempfile.TemporaryDirectory(prefix="safepatch-bench-") as tmp:
        process, base_url = start(
            "safepatch",
            model_dir,
            REPO_ROOT / "adapters",
            Path(tmp),
            extra_env={"SAFEPATCH_ADMIN_TOKEN": ADMIN_TOKEN, "SAFEPATCH_DEV_MODE": "0"},
        )
        try:
            with httpx.Client(base_url=base_url, timeout=60) as http:
                keys = tenant_keys(http)
            print(HEADER, flush=True)
            rows = measure(base_url, keys, args.requests)
        finally:
            stop(process)
    summary = ratios(rows)
    for item in summary:
        print(
            f"{item['workload']:8} c={item['concurrency']:<3} gated/always throughput "
            f"{item['gated_vs_always_throughput']:.2f}, added median TTFT "
            f"{item['added_ttft_p50_s']:+.2f} s"
        )
    RESULTS.mkdir(exist_ok=True)
    result = {"patch": PATCH, "max_tokens": MAX_TOKENS, "rows": rows, "ratios": summary}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, RESULTS / f"{args.out}.png")
    print(f"wrote {RESULTS / args.out}.json and .png")


if __name__ == "__main__":
    main()
