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

import math
from pathlib import Path

import torch

from app.lora import LoraModule, module_path
from app.orthogonality import linalg
from app.orthogonality.adapter import kind_of, layer_of, load_adapter
from app.orthogonality.results import AdapterScore, ModuleScore, SideScore
from app.orthogonality.subspaces import get_store


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


def score_adapter(
    adapter_dir: Path, model_dir: Path, *, k: int | None = None, cache_dir: Path
) -> AdapterScore:
    """Score one adapter against its base model. k: subspace dimension (None: each module's
    rank r). Raises FileNotFoundError (missing adapter/model files) or ValueError (bad k, an
    adapter whose shapes do not fit the model)."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive integer or None; got {k!r}")
    adapter_dir = Path(adapter_dir)
    adapter = load_adapter(adapter_dir)
    store = get_store(Path(model_dir), Path(cache_dir))
    targets: dict[str, tuple[LoraModule, str, int]] = {}
    skipped = list(adapter.skipped)
    for name, f in adapter.modules.items():
        module = module_path(name)
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
        if shape != (f.b.shape[0], f.a.shape[1]):
            raise ValueError(
                f"{adapter_dir.name}: {module} is {f.b.shape[0]}x{f.a.shape[1]} but "
                f"{weight} is {shape[0]}x{shape[1]}; wrong base model?"
            )
        kk = f.rank if k is None else k
        linalg.check_k(kk, shape)
        targets[module] = (f, weight, kk)
    if not targets:
        raise ValueError(f"{adapter_dir.name}: none of its modules exist in {Path(model_dir).name}")
    subspaces = store.get_many({w: kk for _, w, kk in targets.values()})
    groups: dict[tuple[int, int, int, int], list[str]] = {}  # same shapes: one batched pass
    for module, (f, _, kk) in targets.items():
        groups.setdefault((f.b.shape[0], f.a.shape[1], f.rank, kk), []).append(module)
    scored: dict[str, ModuleScore] = {}
    for (d_out, d_in, _, _), names in groups.items():
        facs = [targets[n][0] for n in names]
        subs = [subspaces[targets[n][1]] for n in names]
        proj = linalg.lora_projections(
            [f.b for f in facs],
            [f.a for f in facs],
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
                layer=layer_of(name),
                kind=kind_of(name),
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
    return AdapterScore(adapter_dir.name, store.identity, k, modules, skipped)
