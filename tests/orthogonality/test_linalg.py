"""The pure linear algebra: ΔW's SVD from its factors, φ, angles, energy, randomized SVD."""

from __future__ import annotations

import math

import pytest
import torch

from app.orthogonality import linalg


def _orthonormal(d: int, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, n, generator=gen, dtype=torch.float64))[0]


def _decaying(m: int, n: int, seed: int = 0, rate: float = 0.85) -> torch.Tensor:
    """m × n matrix with singular values rate**i (i = 0..min(m, n)-1)."""
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    U, V = _orthonormal(m, p, gen), _orthonormal(n, p, gen)
    S = rate ** torch.arange(p, dtype=torch.float64)
    return (U * S) @ V.T


@pytest.mark.parametrize("shape", [(96, 64, 8), (40, 200, 5), (64, 64, 1)])
def test_qr_path_equals_dense_svd(shape: tuple[int, int, int]) -> None:
    d_out, d_in, r = shape
    gen = torch.Generator().manual_seed(d_out + r)
    B = torch.randn(d_out, r, generator=gen)
    A = torch.randn(r, d_in, generator=gen)
    s = 1.7
    fast = linalg.lora_delta_svd(B, A, s)
    dense = s * B.double() @ A.double()
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    assert fast.S.shape == (r,)
    torch.testing.assert_close(fast.S, S[:r], atol=1e-5, rtol=1e-5)
    # Singular vectors are defined up to sign: compare the rank-1 pieces and projectors.
    torch.testing.assert_close((fast.U * fast.S) @ fast.V.T, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.V @ fast.V.T, Vh[:r].T @ Vh[:r], atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.U @ fast.U.T, U[:, :r] @ U[:, :r].T, atol=1e-5, rtol=0)
    for i in range(r):
        assert abs(float(fast.V[:, i] @ Vh[i].double())) == pytest.approx(1.0, abs=1e-5)


def test_qr_path_drops_null_directions() -> None:
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(32, 4, generator=gen)
    B[:, 3] = B[:, 0] + B[:, 1]  # rank 3
    A = torch.randn(4, 48, generator=gen)
    assert linalg.lora_delta_svd(B, A, 1.0).S.numel() == 3
    zero = linalg.lora_delta_svd(torch.zeros(32, 4), A, 1.0)  # untrained: B = 0
    assert zero.S.numel() == 0 and zero.V.shape == (48, 0)
    assert math.isnan(linalg.subspace_similarity(zero.V, _orthonormal(48, 4, gen)))
    with pytest.raises(ValueError, match="do not chain"):
        linalg.lora_delta_svd(torch.zeros(32, 4), torch.zeros(3, 48), 1.0)


def test_batched_projections_match_the_2d_formulas() -> None:
    """lora_projections + side_statistics (the scoring path) == lora_delta_svd + the 2-D
    functions, including a rank-deficient and a zero update in the same batch."""
    gen = torch.Generator().manual_seed(7)
    n, d_out, d_in, r, k = 4, 48, 40, 6, 5
    B = torch.randn(n, d_out, r, generator=gen, dtype=torch.float64)
    A = torch.randn(n, r, d_in, generator=gen, dtype=torch.float64)
    B[1, :, 5] = B[1, :, 0] - 2 * B[1, :, 2]  # rank 5
    B[2] = 0  # untrained
    scaling = torch.tensor([0.5, 2.0, 1.0, 4.0], dtype=torch.float64)
    V0 = torch.stack([_orthonormal(d_in, k, gen) for _ in range(n)])
    U0 = torch.stack([_orthonormal(d_out, k, gen) for _ in range(n)])
    proj = linalg.lora_projections(B, A, scaling, V0, U0)
    assert proj.rank.tolist() == [6, 5, 0, 6]
    right = linalg.side_statistics(proj.S, proj.rank, proj.sim_right)
    left = linalg.side_statistics(proj.S, proj.rank, proj.sim_left)
    for i in range(n):
        d = linalg.lora_delta_svd(B[i], A[i], float(scaling[i]))
        assert proj.S[i, : d.S.numel()].tolist() == pytest.approx(d.S.tolist(), rel=1e-9)
        for stats, vecs, base in ((right, d.V, V0[i]), (left, d.U, U0[i])):
            phi = linalg.subspace_similarity(vecs, base)
            if math.isnan(phi):
                assert i == 2 and math.isnan(float(stats["phi"][i]))
                assert math.isnan(float(stats["energy"][i]))
                continue
            assert float(stats["phi"][i]) == pytest.approx(phi, abs=1e-12)
            energy = linalg.energy_fraction(d.S, vecs, base)
            assert float(stats["energy"][i]) == pytest.approx(energy, abs=1e-12)
            angles = linalg.principal_angles(vecs, base)
            got = stats["angles"][i][~torch.isnan(stats["angles"][i])]
            torch.testing.assert_close(got, angles, atol=1e-7, rtol=0)
            sim = linalg.similarity(vecs, base)
            assert float(stats["sim_max"][i]) == pytest.approx(float(sim.abs().max()))
            assert float(stats["sim_fro"][i]) == pytest.approx(float(sim.norm()))


def test_phi_angles_energy_on_known_subspaces() -> None:
    gen = torch.Generator().manual_seed(1)
    d = 50
    Q = _orthonormal(d, 12, gen)
    V0, inside, outside = Q[:, :6], Q[:, :3], Q[:, 6:9]
    assert linalg.subspace_similarity(inside, V0) == pytest.approx(1.0, abs=1e-12)
    assert linalg.subspace_similarity(outside, V0) == pytest.approx(0.0, abs=1e-12)
    # Half in, half out: φ = mean cos² of the principal angles = (1 + 0) / 2.
    mixed = torch.linalg.qr(torch.cat([Q[:, :1], Q[:, 7:8]], dim=1))[0]
    assert linalg.subspace_similarity(mixed, V0) == pytest.approx(0.5, abs=1e-12)
    angles = linalg.principal_angles(mixed, V0)
    torch.testing.assert_close(
        angles, torch.tensor([0.0, math.pi / 2], dtype=torch.float64), atol=1e-6, rtol=0
    )
    # 45°: φ = cos² 45° = 0.5, and all its energy split evenly.
    tilted = ((Q[:, 0] + Q[:, 8]) / math.sqrt(2))[:, None]
    assert math.degrees(float(linalg.principal_angles(tilted, V0)[0])) == pytest.approx(45.0)
    S = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    assert linalg.energy_fraction(S, inside, V0) == pytest.approx(1.0)
    assert linalg.energy_fraction(S, outside, V0) == pytest.approx(0.0, abs=1e-12)
    # Energy weights directions by σ²: only the first (σ = 2) of three is inside.
    part = torch.cat([Q[:, :1], Q[:, 7:9]], dim=1)
    assert linalg.energy_fraction(S, part, V0) == pytest.approx(4 / 5.25)


@pytest.mark.parametrize(("r", "k"), [(8, 8), (16, 4), (4, 16)])
def test_random_subspaces_match_baseline_statistically(r: int, k: int) -> None:
    """φ of uniformly random r-dim subspaces vs a fixed k-dim one averages max(r, k)/d (not
    k/d when r > k), and the energy share averages k/d."""
    d, trials = 200, 300
    gen = torch.Generator().manual_seed(r * 100 + k)
    V0 = _orthonormal(d, k, gen)
    S = torch.ones(r, dtype=torch.float64)
    phis, energies = torch.empty(trials), torch.empty(trials)
    for t in range(trials):
        Vr = _orthonormal(d, r, gen)
        phis[t] = linalg.subspace_similarity(Vr, V0)
        energies[t] = linalg.energy_fraction(S, Vr, V0)
    for values, expected in ((phis, linalg.random_phi_baseline(r, k, d)), (energies, k / d)):
        stderr = float(values.std()) / math.sqrt(trials)
        assert abs(float(values.mean()) - expected) < 4 * stderr, (values.mean(), expected)
    if r > k:  # the naive k/d would be far off
        assert abs(float(phis.mean()) - k / d) > 20 * float(phis.std()) / math.sqrt(trials)


@pytest.mark.parametrize(("m", "n", "k"), [(300, 200, 10), (120, 400, 16)])
def test_randomized_top_k_matches_exact_on_decaying_spectrum(m: int, n: int, k: int) -> None:
    W = _decaying(m, n, seed=m).float()
    exact = linalg.exact_top_k(W, k, dtype=torch.float64)
    approx = linalg.randomized_top_k(W, k, oversample=10, n_iter=4)
    assert approx.U.shape == (m, k) and approx.V.shape == (n, k)
    assert linalg.subspace_similarity(approx.V, exact.V) > 1 - 1e-6
    assert linalg.subspace_similarity(approx.U, exact.U) > 1 - 1e-6
    assert float(linalg.principal_angles(approx.V, exact.V).max()) < math.radians(0.1)
    torch.testing.assert_close(approx.S.double(), exact.S, rtol=1e-4, atol=0)
    assert linalg.residual_norm(W, approx) < 1e-3
    assert linalg.residual_norm(W, exact) < 1e-5


def test_block_krylov_beats_subspace_iteration_on_a_flat_spectrum() -> None:
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(400, 300, generator=gen)  # Marchenko-Pastur: no gap after σ_k
    exact = linalg.exact_top_k(W, 8, dtype=torch.float64)
    crude = linalg.randomized_top_k(W, 8, oversample=2, n_iter=0)
    subspace_iter = linalg.randomized_top_k(W, 8, n_iter=6, krylov=False)
    krylov = linalg.randomized_top_k(W, 8, n_iter=6)
    assert linalg.residual_norm(W, crude) > 10 * linalg.residual_norm(W, krylov)
    assert linalg.residual_norm(W, subspace_iter) > 3 * linalg.residual_norm(W, krylov)
    phi = {
        name: linalg.subspace_similarity(top.V, exact.V)
        for name, top in (("crude", crude), ("iter", subspace_iter), ("krylov", krylov))
    }
    assert phi["krylov"] > phi["iter"] > phi["crude"] + 0.2, phi


@pytest.mark.parametrize("k", [0, -1, 65, 2.0, True])
def test_check_k_rejects(k: object) -> None:
    with pytest.raises(ValueError, match=r"1 <= k <= min\(d_out, d_in\) = 64"):
        linalg.check_k(k, (64, 128))  # type: ignore[arg-type]


def test_orthonormal_complement_and_baseline_edges() -> None:
    gen = torch.Generator().manual_seed(4)
    V = _orthonormal(30, 5, gen)
    C = linalg.orthonormal_complement(V, 7)
    torch.testing.assert_close(C.T @ C, torch.eye(7, dtype=torch.float64), atol=1e-12, rtol=0)
    assert float((V.T @ C).abs().max()) < 1e-12
    assert linalg.random_phi_baseline(4, 4, 64) == 4 / 64
    assert linalg.random_phi_baseline(8, 100, 64) == 1.0
    assert math.isnan(linalg.random_phi_baseline(0, 4, 64))
