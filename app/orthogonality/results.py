"""Orthogonality scores as data: per side, per module, per adapter, with their JSON form and
the ‖ΔW‖²_F-weighted aggregates (formulas in app.orthogonality.scoring)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

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
