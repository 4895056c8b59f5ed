"""Interference between patches: how much two LoRA updates move the same directions."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from app.lora import module_path
from app.orthogonality import linalg
from app.orthogonality.adapter import load_adapter
from app.orthogonality.results import _num


def _pair_rows(
    a: str, b: str, svds: dict[str, dict[str, linalg.LowRankSVD]], detail: bool
) -> dict[str, Any]:
    rows = []
    for module in sorted(set(svds[a]) & set(svds[b])):
        sa, sb = svds[a][module], svds[b][module]
        if sa.V.shape[0] != sb.V.shape[0] or sa.U.shape[0] != sb.U.shape[0]:
            raise ValueError(f"{a} and {b} disagree on the shape of {module}")
        ra, rb = sa.S.numel(), sb.S.numel()
        rows.append(
            {
                "module": module,
                "weight": float(sa.S.norm() * sb.S.norm()),
                "phi_right": linalg.subspace_similarity(sa.V, sb.V),
                "phi_left": linalg.subspace_similarity(sa.U, sb.U),
                "phi_baseline_right": linalg.random_phi_baseline(ra, rb, sa.V.shape[0]),
                "phi_baseline_left": linalg.random_phi_baseline(ra, rb, sa.U.shape[0]),
            }
        )
    live = [r for r in rows if r["weight"] > 0 and math.isfinite(r["phi_right"])]
    total = sum(r["weight"] for r in live)

    def wmean(key: str) -> float | None:
        return _num(sum(r["weight"] * r[key] for r in live) / total) if total > 0 else None

    for r in rows:
        r["phi"] = (r["phi_right"] + r["phi_left"]) / 2
    worst = max(live, key=lambda r: r["phi"], default=None)
    out: dict[str, Any] = {
        "a": a,
        "b": b,
        "shared_modules": len(rows),
        "phi": wmean("phi"),
        "phi_right": wmean("phi_right"),
        "phi_left": wmean("phi_left"),
        "phi_baseline_right": wmean("phi_baseline_right"),
        "phi_baseline_left": wmean("phi_baseline_left"),
        "worst_module": None
        if worst is None
        else {"module": worst["module"], "phi": _num(worst["phi"])},
    }
    if detail:
        out["modules"] = [
            {k: (_num(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows
        ]
    return out


def interference(adapters: dict[str, Path], *, detail: bool = False) -> list[dict[str, Any]]:
    """Pairwise interference: for every pair of adapters and every module both patch,
    φ(V_Δa, V_Δb) and φ(U_Δa, U_Δb) (1: the patches move the same directions, so stacking them
    compounds; baseline max(r_a, r_b)/d for random patches). Rows aggregate modules weighted by
    ‖ΔW_a‖_F·‖ΔW_b‖_F; `detail` adds one row per shared module. Needs no base model."""
    svds = {
        name: {
            module_path(w): linalg.lora_delta_svd(m.b, m.a, m.scaling)
            for w, m in load_adapter(Path(path)).modules.items()
        }
        for name, path in adapters.items()
    }
    return [_pair_rows(x, y, svds, detail) for x, y in itertools.combinations(svds, 2)]
