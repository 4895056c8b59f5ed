"""This machine's fp32 compute roof, in model tokens per second.

roof tok/s = GEMM GFLOP/s / model GFLOP per token, where the GEMM is a batch of token rows
through a SmolLM2 MLP-sized matrix (the shapes that dominate the model) and

    GFLOP/token = 2 * (layers * (d * (q + 2 kv) + q * d + 3 d * d_ff) + vocab * d) / 1e9

(every weight multiplied and added once; attention over the context left out, small at these
lengths; the LM head counted for every token, an upper bound for prompt tokens).

    PYTHONPATH=. .venv/bin/python -m bench.lora_roof [MODEL_DIR]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch


def model_gflop_per_token(model_dir: Path) -> float:
    config = json.loads((model_dir / "config.json").read_text())
    d, d_ff = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or d // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * d_ff
    weights = config["num_hidden_layers"] * per_layer + config["vocab_size"] * d
    return 2 * weights / 1e9


def gemm_gflops(rows: int = 256, d: int = 576, d_ff: int = 1536, seconds: float = 3.0) -> float:
    """fp32 throughput of ``x @ W.T`` with x (rows, d), W (d_ff, d): the larger of the best
    all-threads rate and cores x the best one-thread rate (ideal scaling). On a CPU shared with
    other jobs the all-threads rate collapses (OpenMP threads wait for each other), so the
    one-thread rate times cores is the closer estimate of what the hardware can do."""
    threads = torch.get_num_threads()
    multi = _best_gflops(rows, d, d_ff, seconds / 2)
    torch.set_num_threads(1)
    try:
        single = _best_gflops(rows, d, d_ff, seconds / 2)
    finally:
        torch.set_num_threads(threads)
    return max(multi, single * (os.cpu_count() or 1))


def _best_gflops(rows: int, d: int, d_ff: int, seconds: float) -> float:
    x, w = torch.randn(rows, d), torch.randn(d_ff, d)
    flop = 2 * rows * d * d_ff
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(10):
            torch.mm(x, w.t())
        best = max(best, 10 * flop / (time.perf_counter() - start) / 1e9)
    return best


if __name__ == "__main__":
    gflops = gemm_gflops()
    print(f"fp32 GEMM: {gflops:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    if len(sys.argv) > 1:
        per_token = model_gflop_per_token(Path(sys.argv[1]))
        print(f"model: {per_token:.3f} GFLOP/token -> roof {gflops / per_token:.0f} tok/s")
