"""vLLM CPU knobs, one server after the other, on two-patch LoRA traffic (round robin).

Each variant starts `vllm serve` (safepatch's plugin active) with SmolLM2 fp32 and the two
shipped patches, runs `vllm.benchmarks.serve` once (default: 128 in / 48 out, concurrency
16, 32 prompts) and stops. Ratios to the first variant (`default`) are what to quote.

    PYTHONPATH=. .venv/bin/python -m bench.lora_tuning [--variants default tcmalloc ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from app.config import REPO_ROOT
from app.engine.cpu_tuning import find_library
from bench.lora_serve import PATCHES, RESULTS, default_model_dir, run_client, start, stop


def variants() -> dict[str, tuple[dict[str, str], list[str]]]:
    """name: (extra environment, extra server arguments)."""
    tcmalloc, iomp = find_library("tcmalloc") or "", find_library("iomp") or ""
    return {
        "default": ({}, []),  # vLLM's own: libgomp preloaded, OpenMP threads bound
        "tcmalloc": ({"LD_PRELOAD": tcmalloc}, []),
        "tcmalloc+iomp": ({"LD_PRELOAD": f"{tcmalloc}:{iomp}"}, []),
        "nobind": ({"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, []),
        "batched-512": ({}, ["--max-num-batched-tokens", "512"]),
        "batched-4096": ({}, ["--max-num-batched-tokens", "4096"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(variants()))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=48)
    args = parser.parse_args()
    model_dir = default_model_dir()
    table = variants()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            env, extra = table[name]
            process, base_url = start(
                "vllm", model_dir, REPO_ROOT / "adapters", Path(tmp), env, extra
            )
            try:
                run_client(base_url, model_dir, (64, 16), list(PATCHES), 16)  # warm-up
                results[name] = run_client(
                    base_url,
                    model_dir,
                    (args.input_len, args.output_len),
                    list(PATCHES),
                    args.prompts,
                )
            finally:
                stop(process)
            print(name, results[name], flush=True)
    first = results[args.variants[0]]
    print(f"{'variant':14} {'out tok/s':>9} {'ratio':>6} {'TTFT ms':>8} {'TPOT ms':>8}")
    for name, m in results.items():
        ratio = m["output_throughput"] / first["output_throughput"]
        print(
            f"{name:14} {m['output_throughput']:9.1f} {ratio:6.2f} "
            f"{m['median_ttft_ms']:8.0f} {m['median_tpot_ms']:8.1f}"
        )
    (RESULTS / "lora_tuning.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
