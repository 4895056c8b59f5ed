"""Linear algebra for the orthogonality score: pure functions over tensors, no I/O.

Notation (one targeted module): the base weight W is d_out × d_in; a LoRA update is
ΔW = s·B·A with B d_out × r, A r × d_in and s the adapter's scaling (α/r, or α/√r with rsLoRA).
V₀ / U₀ are the top-k right / left singular vectors of W, V_Δ / U_Δ those of ΔW.

References
- [LoRA]  Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
  https://arxiv.org/abs/2106.09685 — §7.2 and eq. (4): normalized subspace similarity φ.
- [Halko] Halko, Martinsson, Tropp 2011, "Finding Structure with Randomness",
  https://arxiv.org/abs/0909.4061 — Algorithms 4.4 (randomized subspace iteration) and 5.1.
- [Krylov] Musco & Musco 2015, "Randomized Block Krylov Methods for Stronger and Faster
  Approximate Singular Value Decomposition", https://arxiv.org/abs/1504.05477 — Algorithm 2.
- [Björck-Golub] Björck & Golub 1973, "Numerical methods for computing angles between linear
  subspaces" — principal angles as arccos of the singular values of V₁ᵀV₂.
- [Intruders] Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
  Equivalence", https://arxiv.org/abs/2410.21228 — comparing fine-tuned singular vectors with
  the base model's (the approach peft's `tuners/lora/intruders.py` implements).

Everything is upcast before a factorization: fp64 for the small factors (B, A, r × r cores,
k × r products), fp32 (or the caller's choice) for the large base-weight SVD.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch


class LowRankSVD(NamedTuple):
    """Thin SVD M ≈ U·diag(S)·Vᵀ (singular values descending)."""

    U: torch.Tensor  # [m, k]
    S: torch.Tensor  # [k]
    V: torch.Tensor  # [n, k]


def lora_delta_svd(
    B: torch.Tensor, A: torch.Tensor, scaling: float, *, rtol: float = 1e-6
) -> LowRankSVD:
    """Exact thin SVD of ΔW = s·B·A without forming the d_out × d_in matrix.

    B = Q_B·R_B (QR, Q_B d_out × r) and Aᵀ = Q_A·R_A (QR, Q_A d_in × r), so
    ΔW = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ. The SVD of the r × r core, s·R_B·R_Aᵀ = U_c·Σ·V_cᵀ, gives
    U_Δ = Q_B·U_c, V_Δ = Q_A·V_c, singular values Σ. Cost O((d_out + d_in)·r²).

    Singular values below `rtol`·σ₁ are dropped: with fp32 factors they are round-off of a
    rank-deficient update, and their vectors (an arbitrary part of the column spaces, not
    directions ΔW acts on) would count fully in φ. The result has the numerical rank of ΔW,
    possibly 0 (an untrained adapter with B = 0). Computed in fp64.
    """
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"LoRA factors do not chain: B {tuple(B.shape)}, A {tuple(A.shape)}")
    B64 = B.detach().to(torch.float64)  # [d_out, r]
    A64 = A.detach().to(torch.float64)  # [r, d_in]
    Q_B, R_B = torch.linalg.qr(B64)  # [d_out, r], [r, r]
    Q_A, R_A = torch.linalg.qr(A64.T)  # [d_in, r], [r, r]
    core = float(scaling) * (R_B @ R_A.T)  # [r, r]
    U_c, S, V_cT = torch.linalg.svd(core)  # [r, r], [r], [r, r]
    keep = int((rtol * S[0] < S).sum()) if S.numel() and S[0] > 0 else 0
    return LowRankSVD(
        U=Q_B @ U_c[:, :keep],  # [d_out, keep]
        S=S[:keep],  # [keep]
        V=Q_A @ V_cT[:keep].T,  # [d_in, keep]
    )


class DeltaProjections(NamedTuple):
    """Batched projections of n LoRA updates onto base subspaces (see `lora_projections`)."""

    S: torch.Tensor  # [n, r] singular values of ΔW, 0 beyond its numerical rank
    rank: torch.Tensor  # [n] numerical rank of ΔW
    sim_right: torch.Tensor  # [n, r, k] V_Δᵀ·V₀ (rows beyond the rank are 0)
    sim_left: torch.Tensor  # [n, r, k] U_Δᵀ·U₀


def _psd_sqrt(G: torch.Tensor) -> torch.Tensor:
    """R with Rᵀ·R = G for symmetric PSD G ([..., r, r]): R = Λ^½·Wᵀ from G = W·Λ·Wᵀ."""
    lam, W = torch.linalg.eigh(G)  # [..., r], [..., r, r]
    return lam.clamp_min(0).sqrt()[..., :, None] * W.mT  # [..., r, r]


def lora_projections(
    B: torch.Tensor | Sequence[torch.Tensor],
    A: torch.Tensor | Sequence[torch.Tensor],
    scaling: torch.Tensor,
    V0: torch.Tensor | Sequence[torch.Tensor],
    U0: torch.Tensor | Sequence[torch.Tensor],
    *,
    rtol: float = 1e-6,
) -> DeltaProjections:
    """`lora_delta_svd` for n same-shape modules, projected straight onto V₀ / U₀; inputs are
    [n, ...] tensors or length-n sequences of 2-D ones (nothing large is stacked or copied).

    Any R_B with R_Bᵀ·R_B = Bᵀ·B is the R of a factorization B = Q_B·R_B with orthonormal Q_B
    (the QR's triangular R, or — used here, via eigh — the PSD square root), likewise R_A for
    Aᵀ, so ΔW = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ and the r × r core's SVD U_c·Σ·V_cᵀ is ΔW's. Neither Q
    nor V_Δ, U_Δ is formed: U_Δᵀ·B = U_cᵀ·R_B and V_Δᵀ·Aᵀ = V_cᵀ·R_A, hence
        V_Δᵀ·V₀ = Σ⁻¹·U_Δᵀ·ΔW·V₀ = Σ⁻¹·U_cᵀ·s·R_B·(A·V₀),
        U_Δᵀ·U₀ = Σ⁻¹·V_Δᵀ·ΔWᵀ·U₀ = Σ⁻¹·V_cᵀ·s·R_A·(Bᵀ·U₀).
    Per module only O(d·r·(r + k)) fp64 products (Bᵀ·B, A·Aᵀ, A·V₀, Bᵀ·U₀); the rest is
    batched r × r work. Directions with σ ≤ `rtol`·σ₁ are zeroed (`lora_delta_svd` drops
    them), which also keeps Σ⁻¹ bounded.
    """
    n = len(B)
    G_B, G_A, P_A, P_B = [], [], [], []
    for i in range(n):
        b = B[i].detach().to(torch.float64)  # [d_out, r]
        a = A[i].detach().to(torch.float64)  # [r, d_in]
        G_B.append(b.T @ b)  # [r, r]
        G_A.append(a @ a.T)  # [r, r]
        P_A.append(a @ V0[i].to(torch.float64))  # [r, k]
        P_B.append(b.T @ U0[i].to(torch.float64))  # [r, k]
    R_B, R_A = _psd_sqrt(torch.stack(G_B)), _psd_sqrt(torch.stack(G_A))  # [n, r, r]
    s = scaling.to(torch.float64)[:, None, None]  # [n, 1, 1]
    U_c, S, V_cT = torch.linalg.svd(s * (R_B @ R_A.mT))  # [n, r, r], [n, r], [n, r, r]
    live = rtol * S[:, :1] < S  # [n, r]; all False when ΔW = 0
    inv = torch.where(live, 1 / torch.where(live, S, 1.0), 0.0)[..., None]  # [n, r, 1]
    sim_right = inv * (U_c.mT @ (s * R_B) @ torch.stack(P_A))  # [n, r, k]
    sim_left = inv * (V_cT @ (s * R_A) @ torch.stack(P_B))  # [n, r, k]
    return DeltaProjections(S * live, live.sum(-1), sim_right, sim_left)


def side_statistics(
    S: torch.Tensor, rank: torch.Tensor, sim: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Batched per-module statistics from Sim = V_Δᵀ·V₀ ([n, r, k], rows beyond `rank` 0):
    φ = ‖Sim‖²_F / min(rank, k); max |Sim_ij|; ‖Sim‖_F; principal angles arccos σ_i(Sim)
    ([n, min(r, k)] ascending, only the first min(rank, k) meaningful, NaN after); energy
    ‖Σ·Sim‖²_F / ‖Σ‖²_F. Same formulas as the 2-D functions below; NaN for a zero update."""
    n_eff = torch.minimum(rank, torch.full_like(rank, sim.shape[-1])).to(torch.float64)  # [n]
    fro_sq = sim.square().sum((-2, -1))  # [n]
    total = S.square().sum(-1)  # [n]
    sv = torch.linalg.svdvals(sim)  # [n, min(r, k)] descending
    angles = torch.arccos(sv.clamp(0.0, 1.0))  # [n, min(r, k)] ascending
    valid = torch.arange(sv.shape[-1])[None, :] < n_eff[:, None]  # [n, min(r, k)]
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return {
        "phi": torch.where(n_eff > 0, fro_sq / n_eff.clamp_min(1), nan),
        "sim_max": sim.abs().amax((-2, -1)) if sim.numel() else torch.zeros(sim.shape[0]),
        "sim_fro": fro_sq.sqrt(),
        "angles": torch.where(valid, angles, nan),
        "energy": torch.where(
            total > 0,
            (S[..., None] * sim).square().sum((-2, -1))
            / total.clamp_min(torch.finfo(torch.float64).tiny),
            nan,
        ),
    }


def exact_top_k(W: torch.Tensor, k: int, *, dtype: torch.dtype = torch.float32) -> LowRankSVD:
    """Top-k singular triplets of W from a full thin SVD (LAPACK gesdd) in `dtype`.

    W = U·Σ·Vᵀ; returns U[:, :k], Σ[:k], V[:, :k]. Cost O(d_out·d_in·min(d_out, d_in)).
    """
    check_k(k, W.shape)
    U, S, Vh = torch.linalg.svd(W.detach().to(dtype), full_matrices=False)
    return LowRankSVD(U=U[:, :k], S=S[:k], V=Vh[:k].T)  # [d_out, k], [k], [d_in, k]


def randomized_top_k(
    W: torch.Tensor,
    k: int,
    *,
    oversample: int = 10,
    n_iter: int = 6,
    krylov: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LowRankSVD:
    """Top-k singular triplets of W by a randomized range finder ([Halko], [Krylov]).

    With l = k + p (p = `oversample`) and a Gaussian test matrix Ω (d_in × l): Y₀ = orth(W·Ω),
    Y_{j+1} = orth(W·orth(Wᵀ·Y_j)) for j < q = `n_iter` (QR every half-step against
    round-off). Subspace iteration ([Halko] Alg. 4.4) keeps Q = Y_q, whose error decays like
    (σ_{l+1}/σ_k)^(2q+1); block Krylov (`krylov=True`, [Krylov] Alg. 2) keeps
    Q = orth([Y₀, …, Y_q]) (d_out × l(q+1)), whose error decays like exp(−q·√gap), which is
    what base weights with flat spectra (σ_k ≈ σ_{k+1}) need. Then ([Halko] Alg. 5.1) the SVD
    of the small matrix Qᵀ·W = Ũ·Σ·Vᵀ gives U = Q·Ũ. Cost O(d_out·d_in·l·(2q + 2)) flops;
    deterministic for a given `seed`.
    """
    check_k(k, W.shape)
    d_out, d_in = W.shape
    Wf = W.detach().to(dtype)  # [d_out, d_in]
    width = min(k + oversample, d_out, d_in)  # l
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(d_in, width, generator=gen, dtype=dtype).to(Wf.device)  # [d_in, l]
    blocks = [torch.linalg.qr(Wf @ omega)[0]]  # [d_out, l]
    for _ in range(n_iter):
        Z = torch.linalg.qr(Wf.T @ blocks[-1])[0]  # [d_in, l]
        blocks.append(torch.linalg.qr(Wf @ Z)[0])  # [d_out, l]
    basis = torch.cat(blocks, dim=1)[:, : min(d_out, d_in)] if krylov else blocks[-1]
    Q = torch.linalg.qr(basis)[0] if krylov else basis  # [d_out, l·(q+1)] or [d_out, l]
    small = Q.T @ Wf  # [l', d_in]
    U_s, S, Vh = torch.linalg.svd(small, full_matrices=False)  # [l', l'], [l'], [l', d_in]
    return LowRankSVD(U=(Q @ U_s)[:, :k], S=S[:k], V=Vh[:k].T)  # [d_out,k], [k], [d_in,k]


def residual_norm(W: torch.Tensor, top: LowRankSVD) -> float:
    """A-posteriori quality of approximate singular triplets: max_i ‖W·v_i − σ_i·u_i‖₂ / σ_i.

    Exact triplets give 0. For [Halko]'s output Wᵀ·u_i = σ_i·v_i holds exactly, so this one
    residual bounds how far (u_i, σ_i, v_i) is from a true triplet (with the spectral gap,
    Wedin's theorem turns it into an angle bound). Cost one W × k product.
    """
    dtype = top.V.dtype
    WV = W.detach().to(dtype) @ top.V  # [d_out, k]
    R = WV - top.U * top.S  # [d_out, k]
    return float((R.norm(dim=0) / top.S.clamp_min(torch.finfo(dtype).tiny)).max())


def similarity(V_a: torch.Tensor, V_b: torch.Tensor) -> torch.Tensor:
    """The paper's similarity matrix Sim = V_aᵀ·V_b (r × k) of two orthonormal bases, in fp64."""
    return V_a.to(torch.float64).T @ V_b.to(torch.float64)  # [r, k]


def subspace_similarity(V_a: torch.Tensor, V_b: torch.Tensor) -> float:
    """Normalized subspace similarity φ = ‖V_aᵀ·V_b‖²_F / min(r, k) ∈ [0, 1] ([LoRA] eq. 4).

    1 when one span contains the other, 0 when they are orthogonal; the mean of cos² of the
    min(r, k) principal angles. Either side empty (rank-0 update) gives NaN.
    """
    n = min(V_a.shape[1], V_b.shape[1])
    if n == 0:
        return math.nan
    return float(similarity(V_a, V_b).square().sum() / n)


def principal_angles(V_a: torch.Tensor, V_b: torch.Tensor) -> torch.Tensor:
    """Principal angles θ_i = arccos σ_i(V_aᵀ·V_b) in radians, ascending ([Björck-Golub]).

    Returns min(r, k) angles; the singular values are clamped to [0, 1] against round-off.
    """
    sv = torch.linalg.svdvals(similarity(V_a, V_b))  # [min(r, k)]
    return torch.arccos(sv.clamp(0.0, 1.0)).sort().values


def energy_fraction(S_delta: torch.Tensor, V_delta: torch.Tensor, V0: torch.Tensor) -> float:
    """Share of ΔW's energy inside span(V₀): ‖ΔW·V₀‖²_F / ‖ΔW‖²_F ∈ [0, 1].

    With ΔW = U_Δ·Σ·V_Δᵀ: ‖ΔW·V₀‖²_F = ‖Σ·V_Δᵀ·V₀‖²_F and ‖ΔW‖²_F = Σσ_i², so no
    d_out × d_in matrix is formed. Left side: pass (Σ, U_Δ, U₀) for ‖U₀ᵀ·ΔW‖²_F / ‖ΔW‖²_F.
    A random direction puts k/d of its energy into a k-dim subspace of ℝ^d. NaN if ΔW = 0.
    """
    total = S_delta.to(torch.float64).square().sum()
    if total <= 0:
        return math.nan
    inside = (S_delta.to(torch.float64)[:, None] * similarity(V_delta, V0)).square().sum()
    return float(inside / total)


def random_phi_baseline(r: int, k: int, d: int) -> float:
    """E[φ] between a uniformly random r-dim subspace and a fixed k-dim one in ℝ^d.

    E‖V_rᵀ·V_k‖²_F = r·k/d, so E[φ] = r·k / (d·min(r, k)) = max(r, k)/d, which is the
    issue's k/d at the default k = r. Capped at 1.
    """
    if min(r, k) <= 0:
        return math.nan
    return min(1.0, max(r, k) / d)


def check_k(k: int, shape: tuple[int, ...] | torch.Size) -> None:
    """Raise ValueError unless 1 ≤ k ≤ min(d_out, d_in)."""
    limit = min(int(shape[0]), int(shape[1]))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
        raise ValueError(
            f"k must be an integer with 1 <= k <= min(d_out, d_in) = {limit} for a "
            f"{int(shape[0])}x{int(shape[1])} weight; got {k!r}"
        )


def orthonormal_complement(V: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """n orthonormal columns orthogonal to span(V) (d × k): QR of (I − V·Vᵀ)·G, G Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    V64 = V.to(torch.float64)  # [d, k]
    G = torch.randn(V.shape[0], n, generator=gen, dtype=torch.float64)  # [d, n]
    G = G - V64 @ (V64.T @ G)  # [d, n]
    G = G - V64 @ (V64.T @ G)  # [d, n] second pass against round-off
    return torch.linalg.qr(G)[0]  # [d, n]
