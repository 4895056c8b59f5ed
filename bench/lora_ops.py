"""Microbenchmark: one forward pass worth of CPU LoRA work for SmolLM2-135M, three ways.

Runs vLLM's `PunicaWrapperCPU.add_lora_linear` for every LoRA layer of SmolLM2-135M (30 layers
x qkv / o / gate_up / down, rank padded to 16, 4 slots) on a decode batch (16 rows, two
adapters round-robin) and a prefill chunk (two 64-token prompts of different adapters, one
base prompt), with

- ``vllm``:    vLLM 0.32's torch ops (per-row weight gather + batched GEMV);
- ``ops``:     the grouped ops swapped in at op level (regrouping in every call);
- ``wrapper``: the grouped ops with one grouping per step in the punica wrapper (installed);

next to the base model's own matmuls for the same rows, so the LoRA share of a step shows.
All modes run back to back in one process; quote ratios (the CPU is shared).

    PYTHONPATH=. .venv/bin/python -m bench.lora_ops
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from app.engine import cpu_lora_fix, cpu_lora_ops

LAYERS, HIDDEN, INTER, KV, RANK, SLOTS = 30, 576, 1536, 192, 16, 4
MODULES = {  # name: (d_in, output slices)
    "qkv": (HIDDEN, (HIDDEN, KV, KV)),
    "o": (HIDDEN, (HIDDEN,)),
    "gate_up": (HIDDEN, (INTER, INTER)),
    "down": (INTER, (HIDDEN,)),
}
OPS = [f"{kind}_{op}" for kind in ("bgmv", "sgmv") for op in ("shrink", "expand", "expand_slice")]
METHODS = list(cpu_lora_fix._EXPECTED_METHODS)
RESULT = Path(__file__).parent / "results" / "lora_ops.json"


def _snapshot() -> tuple[dict[str, Callable], dict[str, Callable]]:
    return (
        {name: getattr(lora_ops, name) for name in OPS},
        {name: getattr(PunicaWrapperCPU, name) for name in METHODS},
    )


def _install(functions: dict[str, Callable], methods: dict[str, Callable]) -> None:
    for name, function in functions.items():
        setattr(lora_ops, name, function)
        setattr(punica_cpu, name, function)
    for name, method in methods.items():
        setattr(PunicaWrapperCPU, name, method)


def _weights(gen: torch.Generator) -> dict[str, tuple]:
    weights = {}
    for name, (d_in, widths) in MODULES.items():
        a = tuple(torch.randn(SLOTS, 1, RANK, d_in, generator=gen) * 0.02 for _ in widths)
        b = tuple(torch.randn(SLOTS, 1, w, RANK, generator=gen) * 0.02 for w in widths)
        base = torch.randn(sum(widths), d_in, generator=gen) * 0.02
        weights[name] = (a, b, widths, base)
    return weights


def _step(wrapper: PunicaWrapperCPU, weights: dict, x: dict, lora: bool) -> None:
    for _ in range(LAYERS):
        for name, (a, b, widths, base) in weights.items():
            y = x[name] @ base.t()  # the base layer's own GEMM
            if lora:
                wrapper.add_lora_linear(y, x[name], a, b, 1.0, widths)


def _once(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(repeats: int = 5) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    weights = _weights(gen)
    vllm_ops = _snapshot()
    assert cpu_lora_fix.register(), "plugin not installed (SAFEPATCH_CPU_LORA_FIX=0?)"
    wrapper_ops = _snapshot()
    op_level = ({n: getattr(cpu_lora_ops, n) for n in OPS}, vllm_ops[1])
    batches = {  # LoRA ids per row: 0 = base, k = slot k - 1
        "decode": [1 + (i % 2) for i in range(16)],
        "prefill": [1] * 64 + [2] * 64 + [0] * 64,
    }
    modes = {"vllm": vllm_ops, "ops": op_level, "wrapper": wrapper_ops}
    results: dict[str, dict[str, float]] = {}
    for batch, ids in batches.items():
        tokens = len(ids)
        x = {n: torch.randn(tokens, d_in, generator=gen) for n, (d_in, _) in MODULES.items()}
        wrapper = PunicaWrapperCPU(max_num_batched_tokens=1024, max_batches=64, device="cpu")
        mapping = LoRAMapping(ids, ids, is_prefill=True)
        samples: dict[str, list[float]] = {mode: [] for mode in ("base", *modes)}
        # Modes interleaved, best of N: the CPU is shared, the minimum is the least disturbed.
        for _ in range(repeats):
            samples["base"].append(_once(partial(_step, wrapper, weights, x, False)))
            for mode, installed in modes.items():
                _install(*installed)
                wrapper.update_metadata(mapping, [1, 2, 3, 4], SLOTS, 1)
                samples[mode].append(_once(partial(_step, wrapper, weights, x, True)))
        results[batch] = {mode: min(times) for mode, times in samples.items()}
        print(batch, {m: round(t * 1e3, 1) for m, t in results[batch].items()}, flush=True)
    _install(*wrapper_ops)
    print("ms per step (+ LoRA overhead over the base matmuls)")
    print(f"{'batch':8} {'base':>8} " + " ".join(f"{m:>17}" for m in ("vllm", "ops", "wrapper")))
    for batch, row in results.items():
        lora = {m: (t - row["base"]) * 1e3 for m, t in row.items() if m != "base"}
        print(
            f"{batch:8} {row['base'] * 1e3:8.1f} "
            + " ".join(f"{row[m] * 1e3:8.1f} (+{lora[m]:6.1f})" for m in lora)
        )
    RESULT.write_text(json.dumps({"seconds_per_step": results, "batches": batches}, indent=1))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
