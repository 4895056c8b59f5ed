"""Orthogonality of a LoRA patch to its base model, per module / layer / adapter, and
interference between patches.

Per module (see `linalg` for the formulas): φ = ‖V_Δᵀ·V₀‖²_F / min(r, k) on the right side
(the paper's Sim = V_Δᵀ·V₀) and the same with U on the left; orthogonality = 1 − φ. The
random-subspace baseline is E[φ] = max(r, k)/d (= k/d at the default k = r). Layers and the
adapter aggregate φ as a mean weighted by ‖ΔW‖²_F; the worst module is the least orthogonal.
`side="both"` (the default report) headlines the right side — the paper's measure: an update
whose A rows lie in span(V₀) scores φ = 1 — and reports the left side beside it as
`left_phi` / `left_orthogonality` / `left_phi_baseline` / `left_baseline` (plus the full
`right` and `left` blocks). `side="left"` headlines the left side alone.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from app.orthogonality import linalg
from app.orthogonality.adapter import LoraFactors, load_adapter
from app.orthogonality.subspaces import get_store

Side = Literal["right", "left", "both"]
SIDES: tuple[str, ...] = ("right", "left", "both")


def _num(x: float | None) -> float | None:
    """JSON-safe float: NaN/inf -> None."""
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class SideScore:
    phi: float
    phi_baseline: float
    sim_max: float  # max |(V_Δᵀ V₀)_ij|
    sim_fro: float  # ‖V_Δᵀ V₀‖_F
    angles_deg: list[float]  # principal angles, ascending
    energy: float  # ‖ΔW V₀‖²_F / ‖ΔW‖²_F (left: ‖U₀ᵀ ΔW‖²_F / ‖ΔW‖²_F)
    energy_baseline: float  # k/d

    def to_dict(self) -> dict[str, Any]:
        return {
            "phi": _num(self.phi),
            "orthogonality": _num(1 - self.phi),
            "phi_baseline": _num(self.phi_baseline),
            "baseline": _num(1 - self.phi_baseline),
            "sim_max": _num(self.sim_max),
            "sim_fro": _num(self.sim_fro),
            "principal_angles_deg": [round(a, 4) for a in self.angles_deg],
            "energy_fraction": _num(self.energy),
            "energy_baseline": _num(self.energy_baseline),
        }


def _batch_side_scores(
    S: torch.Tensor, rank: torch.Tensor, sim: torch.Tensor, d: int
) -> list[SideScore]:
    stats = {key: value.tolist() for key, value in linalg.side_statistics(S, rank, sim).items()}
    k = sim.shape[-1]
    return [
        SideScore(
            phi=stats["phi"][i],
            phi_baseline=linalg.random_phi_baseline(int(r), k, d),
            sim_max=stats["sim_max"][i] if r else math.nan,
            sim_fro=stats["sim_fro"][i] if r else math.nan,
            angles_deg=[math.degrees(a) for a in stats["angles"][i] if math.isfinite(a)],
            energy=stats["energy"][i],
            energy_baseline=k / d,
        )
        for i, r in enumerate(rank.tolist())
    ]


@dataclass(frozen=True)
class ModuleScore:
    module: str
    weight: str  # base weight name
    layer: int | None
    kind: str
    shape: tuple[int, int]  # (d_out, d_in)
    rank: int  # adapter rank r
    k: int
    scaling: float
    delta_fro_sq: float  # ‖ΔW‖²_F
    right: SideScore
    left: SideScore
    method: str  # how V₀/U₀ were computed

    def phi(self, side: Side) -> tuple[float, float]:
        """(φ, φ baseline) headlined for `side` ("both" headlines the right side)."""
        s = self.left if side == "left" else self.right
        return s.phi, s.phi_baseline

    def to_dict(self, side: Side, total: float) -> dict[str, Any]:
        phi, base = self.phi(side)
        row: dict[str, Any] = {
            "module": self.module,
            "layer": self.layer,
            "kind": self.kind,
            "d_out": self.shape[0],
            "d_in": self.shape[1],
            "r": self.rank,
            "k": self.k,
            "scaling": self.scaling,
            "delta_fro_sq": _num(self.delta_fro_sq),
            "energy_share": _num(self.delta_fro_sq / total) if total > 0 else None,
            "phi": _num(phi),
            "orthogonality": _num(1 - phi),
            "phi_baseline": _num(base),
            "baseline": _num(1 - base),
            "phi_ratio": _num(phi / base) if base > 0 else None,
            **(_left_beside(self.left.phi, self.left.phi_baseline) if side == "both" else {}),
            "subspace_method": self.method,
        }
        for name in ("right", "left") if side == "both" else (side,):
            row[name] = getattr(self, name).to_dict()
        return row


def _left_beside(phi: float | None, base: float | None) -> dict[str, Any]:
    """The left side's φ under its own names, next to a right-side headline."""
    ok = phi is not None and math.isfinite(phi)
    ok_base = base is not None and math.isfinite(base)
    return {
        "left_phi": _num(phi) if ok else None,
        "left_orthogonality": _num(1 - phi) if ok and phi is not None else None,
        "left_phi_baseline": _num(base) if ok_base else None,
        "left_baseline": _num(1 - base) if ok_base and base is not None else None,
    }


def aggregate(mods: list[ModuleScore], side: Side) -> dict[str, Any]:
    """φ and baseline as means weighted by ‖ΔW‖²_F over modules with a non-zero update;
    "both": the right side's, with the left side's beside it (`left_*`)."""
    if side == "both":
        left = aggregate(mods, "left")
        return aggregate(mods, "right") | _left_beside(left["phi"], left["phi_baseline"])
    live = [m for m in mods if m.delta_fro_sq > 0 and math.isfinite(m.phi(side)[0])]
    total = sum(m.delta_fro_sq for m in live)
    if not live or total <= 0:
        return {
            "orthogonality": None,
            "phi": None,
            "baseline": None,
            "phi_baseline": None,
            "phi_ratio": None,
        }
    phi = sum(m.delta_fro_sq * m.phi(side)[0] for m in live) / total
    base = sum(m.delta_fro_sq * m.phi(side)[1] for m in live) / total
    return {
        "orthogonality": _num(1 - phi),
        "phi": _num(phi),
        "baseline": _num(1 - base),
        "phi_baseline": _num(base),
        "phi_ratio": _num(phi / base) if base > 0 else None,
    }


@dataclass
class AdapterScore:
    adapter: str
    model: dict[str, str]  # model_identity
    k: int | None  # requested k (None: each module's rank)
    modules: list[ModuleScore]
    skipped: list[dict[str, str]] = field(default_factory=list)

    def worst_module(self, side: Side = "both") -> ModuleScore | None:
        live = [m for m in self.modules if m.delta_fro_sq > 0 and math.isfinite(m.phi(side)[0])]
        return max(live, key=lambda m: m.phi(side)[0], default=None)

    def layers(self, side: Side = "both") -> list[dict[str, Any]]:
        by_layer: dict[int | None, list[ModuleScore]] = {}
        for m in self.modules:
            by_layer.setdefault(m.layer, []).append(m)
        return [
            {"layer": layer, "n_modules": len(mods), **aggregate(mods, side)}
            for layer, mods in sorted(by_layer.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        ]

    def to_dict(self, detail: bool = True, side: Side = "both") -> dict[str, Any]:
        """Summary (`orthogonality`, `phi`, `baseline`, `phi_baseline`, `worst_module`, ...);
        with `detail`, also `layers` and `modules` (one row per module)."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)}; got {side!r}")
        worst = self.worst_module(side)
        total = sum(m.delta_fro_sq for m in self.modules)
        out: dict[str, Any] = {
            "adapter": self.adapter,
            "model": self.model,
            "side": side,
            "k": self.k,
            "ranks": sorted({m.rank for m in self.modules}),
            "n_modules": len(self.modules),
            **aggregate(self.modules, side),
            "worst_module": None
            if worst is None
            else {
                key: worst.to_dict(side, total)[key]
                for key in (
                    "module",
                    "phi",
                    "orthogonality",
                    "phi_baseline",
                    "baseline",
                    "phi_ratio",
                    *(("left_phi", "left_orthogonality") if side == "both" else ()),
                )
            },
            "skipped": self.skipped,
        }
        if side == "both":
            out["right"] = aggregate(self.modules, "right")
            out["left"] = aggregate(self.modules, "left")
        if detail:
            out["layers"] = self.layers(side)
            out["modules"] = [m.to_dict(side, total) for m in self.modules]
        return out


def score_adapter(
    adapter_dir: Path, model_dir: Path, *, k: int | None = None, cache_dir: Path
) -> AdapterScore:
    """Score one adapter against its base model. k: subspace dimension (None: each module's
    rank r). Raises FileNotFoundError (missing adapter/model files) or ValueError (bad k, an
    adapter whose shapes do not fit the model)."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive integer or None; got {k!r}")
    adapter = load_adapter(Path(adapter_dir))
    store = get_store(Path(model_dir), Path(cache_dir))
    targets: dict[str, tuple[LoraFactors, str, int]] = {}
    skipped = list(adapter.skipped)
    for module, f in adapter.modules.items():
        weight = store.resolve(module)
        if weight is None:
            skipped.append(
                {
                    "module": module,
                    "reason": "no 2-D base weight of that name in the "
                    "model (e.g. lm_head with tied embeddings)",
                }
            )
            continue
        shape = store.shape(weight)
        if shape != (f.B.shape[0], f.A.shape[1]):
            raise ValueError(
                f"{adapter.name}: {module} is {f.B.shape[0]}x{f.A.shape[1]} but "
                f"{weight} is {shape[0]}x{shape[1]}; wrong base model?"
            )
        kk = f.rank if k is None else k
        linalg.check_k(kk, shape)
        targets[module] = (f, weight, kk)
    if not targets:
        raise ValueError(f"{adapter.name}: none of its modules exist in {Path(model_dir).name}")
    subspaces = store.get_many({w: kk for _, w, kk in targets.values()})
    groups: dict[tuple[int, int, int, int], list[str]] = {}  # same shapes: one batched pass
    for module, (f, _, kk) in targets.items():
        groups.setdefault((f.B.shape[0], f.A.shape[1], f.rank, kk), []).append(module)
    scored: dict[str, ModuleScore] = {}
    for (d_out, d_in, _, _), names in groups.items():
        facs = [targets[n][0] for n in names]
        subs = [subspaces[targets[n][1]] for n in names]
        proj = linalg.lora_projections(
            [f.B for f in facs],
            [f.A for f in facs],
            torch.tensor([f.scaling for f in facs]),
            [s.V for s in subs],
            [s.U for s in subs],
        )
        rights = _batch_side_scores(proj.S, proj.rank, proj.sim_right, d_in)
        lefts = _batch_side_scores(proj.S, proj.rank, proj.sim_left, d_out)
        energies = proj.S.square().sum(-1).tolist()
        for i, name in enumerate(names):
            f, weight, kk = targets[name]
            scored[name] = ModuleScore(
                module=name,
                weight=weight,
                layer=f.layer,
                kind=f.kind,
                shape=(d_out, d_in),
                rank=f.rank,
                k=kk,
                scaling=f.scaling,
                delta_fro_sq=energies[i],
                right=rights[i],
                left=lefts[i],
                method=subs[i].method,
            )
    modules = [scored[name] for name in targets]
    return AdapterScore(adapter.name, store.identity, k, modules, skipped)


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
        name: {m: f.svd() for m, f in load_adapter(Path(path)).modules.items()}
        for name, path in adapters.items()
    }
    return [_pair_rows(x, y, svds, detail) for x, y in itertools.combinations(svds, 2)]
