"""Benchmark for issue 5: orthogonality scoring at Llama-3-8B shapes on synthetic weights.

1. Scoring with cached subspaces: a virtual Llama-3-8B directory (config + a *sparse*
   safetensors file with real headers for all 32 × 7 linear weights, ~14 GB apparent, ~0 on
   disk), its subspace cache filled with random orthonormal V₀/U₀ (k = 16), and an r = 16
   adapter on every linear module; times `score_adapter` end to end, cold (disk cache, new
   store) and warm (subspaces in memory).
2. Randomized vs exact top-k on a subset of shapes: synthetic weights with a Llama-like
   spectrum (64 slowly decaying spikes over a Marchenko-Pastur bulk, entries ~0.02); speed
   ratio and accuracy (φ between subspaces, largest principal angle, singular values,
   residual, and the effect on an adapter's φ) of the store's block Krylov (with its residual
   check) and of plain subspace iteration, against torch.linalg.svd.

    OMP_NUM_THREADS=2 .venv/bin/python bench/orthogonality.py [--subset k_proj,q_proj]

Prints a table and writes bench/results/orthogonality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from app.orthogonality import linalg, subspaces
from app.orthogonality.adapter import load_adapter
from app.orthogonality.scoring import score_adapter
from app.orthogonality.subspaces import SubspaceStore
from bench.llama3_virtual import (
    SHAPES,
    K,
    R,
    fill_cache,
    synthetic_weight,
    write_adapter,
    write_virtual_model,
)

RESULTS = Path(__file__).resolve().parent / "results" / "orthogonality.json"


def bench_scoring(work: Path, repeats: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    model = write_virtual_model(work / "llama3-8b-virtual")
    cache = work / "cache"
    fill_cache(SubspaceStore(model, cache, memory=False), gen)
    adapter = write_adapter(work / "patch-r16", gen)
    cold, warm = [], []
    for _ in range(repeats):
        subspaces.forget_stores()  # a fresh process: the subspaces come from disk
        start = time.perf_counter()
        result = score_adapter(adapter, model, cache_dir=cache)
        cold.append(time.perf_counter() - start)
    for _ in range(repeats):
        start = time.perf_counter()
        result = score_adapter(adapter, model, cache_dir=cache)
        warm.append(time.perf_counter() - start)
    start = time.perf_counter()
    loaded = load_adapter(adapter)
    t_load = time.perf_counter() - start
    start = time.perf_counter()
    for f in loaded.modules.values():
        linalg.lora_delta_svd(f.b, f.a, f.scaling)
    t_svd = time.perf_counter() - start
    summary = result.to_dict(detail=False)
    return {
        "modules": len(result.modules),
        "r": R,
        "k": K,
        "cold_s": statistics.median(cold),
        "warm_s": statistics.median(warm),
        "cold_all_s": cold,
        "warm_all_s": warm,
        "load_adapter_s": t_load,
        "qr_path_delta_svd_all_modules_s": t_svd,  # the 2-D path interference() uses
        "adapter_mb": (adapter / "adapter_model.safetensors").stat().st_size / 2**20,
        "orthogonality": summary["orthogonality"],
        "baseline": summary["baseline"],
        "goal_s": 1.0,
    }


def accuracy(
    W: torch.Tensor,
    top: linalg.LowRankSVD,
    exact: linalg.LowRankSVD,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, float]:
    out = {
        "phi_V": linalg.subspace_similarity(top.V, exact.V),
        "phi_U": linalg.subspace_similarity(top.U, exact.U),
        "max_angle_deg": math.degrees(float(linalg.principal_angles(top.V, exact.V).max())),
        "sigma_rel_err": float(((top.S - exact.S).abs() / exact.S).max()),
        "residual": linalg.residual_norm(W, top),
    }
    for name, (B, A) in factors.items():  # effect on an adapter's score
        d = linalg.lora_delta_svd(B, A, 2.0)
        out[f"dphi_{name}"] = abs(
            linalg.subspace_similarity(d.V, top.V) - linalg.subspace_similarity(d.V, exact.V)
        )
    return out


def bench_subspaces(kinds: list[str]) -> list[dict[str, object]]:
    rows = []
    for kind in kinds:
        d_out, d_in = SHAPES[kind]
        gen = torch.Generator().manual_seed(list(SHAPES).index(kind))
        W = synthetic_weight(d_out, d_in, gen)
        start = time.perf_counter()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # what exact_top_k runs
        t_exact = time.perf_counter() - start
        exact = linalg.LowRankSVD(U[:, :K], S[:K], Vh[:K].T)
        g = torch.Generator().manual_seed(1)
        V_ex = exact.V.double()
        factors = {  # a random patch and one whose A rows lie half inside span(V₀)
            "random": (torch.randn(d_out, R, generator=g), torch.randn(R, d_in, generator=g)),
            "half_inside": (
                torch.randn(d_out, R, generator=g),
                torch.cat(
                    [
                        torch.randn(R // 2, K, generator=g, dtype=torch.float64) @ V_ex.T,
                        torch.randn(R // 2, d_in, generator=g, dtype=torch.float64),
                    ]
                ),
            ),
        }
        start = time.perf_counter()
        top, method, _, n_iter = subspaces.top_k_subspace(W, K)
        t_store = time.perf_counter() - start
        start = time.perf_counter()
        plain = linalg.randomized_top_k(W, K, n_iter=4, krylov=False)
        t_plain = time.perf_counter() - start
        rows.append(
            {
                "kind": kind,
                "shape": [d_out, d_in],
                "k": K,
                "exact_s": t_exact,
                "store_s": t_store,
                "store_method": method,
                "store_n_iter": n_iter,
                "store_speedup": t_exact / t_store,
                "store": accuracy(W, top, exact, factors),
                "subspace_iter_q4_s": t_plain,
                "subspace_iter_q4_speedup": t_exact / t_plain,
                "subspace_iter_q4": accuracy(W, plain, exact, factors),
                "sigma_k_over_sigma_1": float(S[K - 1] / S[0]),
                "sigma_k_over_sigma_k+1": float(S[K - 1] / S[K]),
                "sigma_k_over_sigma_k+p+1": float(S[K - 1] / S[K + 10]),
            }
        )
        print(
            f"  {kind}: exact {t_exact:.1f}s, store {t_store:.2f}s ({method}, q={n_iter})",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--subset",
        default="k_proj,q_proj",
        help=f"shapes for randomized vs exact, from {','.join(SHAPES)}",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    kinds = [k for k in args.subset.split(",") if k]
    unknown = set(kinds) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="safepatch-bench-") as tmp:
        print("scoring with cached subspaces ...", flush=True)
        scoring = bench_scoring(Path(tmp), args.repeats)
    print("randomized vs exact top-k ...", flush=True)
    rows = bench_subspaces(kinds)
    report = {
        "args": {"subset": kinds, "repeats": args.repeats},
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg": os.getloadavg(),
        },
        "scoring": scoring,
        "subspaces": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    s = scoring
    print(
        f"\nLlama-3-8B shapes, {s['modules']} modules, r = {R}, k = {K}, "
        f"torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.1f}"
    )
    print(
        f"score_adapter with cached subspaces: cold {s['cold_s']:.3f} s, warm "
        f"{s['warm_s']:.3f} s (goal <= 1 s); of which adapter load {s['load_adapter_s']:.3f}"
        f" s ({s['adapter_mb']:.0f} MiB)\n(the per-module 2-D QR path that interference() uses: "
        f"{s['qr_path_delta_svd_all_modules_s']:.3f} s per adapter)"
    )
    print(
        "\ntop-k = 16 subspaces, randomized vs torch.linalg.svd (x: speed-up; phi_V, max angle:"
        " vs exact; dphi: change in an r = 16 adapter's phi, random / half inside span V0)"
    )
    head = (
        f"{'matrix':<10} {'shape':>11} {'exact s':>8} {'method':>18} {'s':>6} {'x':>6} "
        f"{'phi_V':>9} {'max∠°':>7} {'σ err':>8} {'resid':>8} {'dphi_rnd':>9} "
        f"{'dphi_half':>9}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        for label, key, t, x in (
            (
                f"krylov q={r['store_n_iter']}"
                if r["store_method"] == "randomized"
                else r["store_method"],
                "store",
                r["store_s"],
                r["store_speedup"],
            ),
            (
                "subspace-iter q=4",
                "subspace_iter_q4",
                r["subspace_iter_q4_s"],
                r["subspace_iter_q4_speedup"],
            ),
        ):
            a = r[key]
            print(
                f"{r['kind']:<10} {'x'.join(map(str, r['shape'])):>11} {r['exact_s']:>8.1f} "
                f"{label:>18} {t:>6.2f} {x:>6.1f} {a['phi_V']:>9.6f} "
                f"{a['max_angle_deg']:>7.3f} {a['sigma_rel_err']:>8.1e} {a['residual']:>8.1e} "
                f"{a['dphi_random']:>9.1e} {a['dphi_half_inside']:>9.1e}"
            )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
