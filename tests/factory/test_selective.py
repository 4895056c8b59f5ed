"""Harm-selective input subspaces (app/factory/selective.py): the linear algebra on known
answers, the moment collector against a hand computation, and training that stays inside."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.factory.selective import (
    InSubspace,
    MomentCollector,
    constrain_lora_inputs,
    materialise_lora_inputs,
    selective_basis,
)
from tests.support.tiny_training import tiny_config


def energy_ratio(x: torch.Tensor, basis: torch.Tensor) -> float:
    """Share of the inputs' energy inside span(basis): E‖Qᵀx‖² / E‖x‖², x (n, d)."""
    q, _ = torch.linalg.qr(basis.double())
    return float(((x.double() @ q) ** 2).sum() / (x.double() ** 2).sum())


def test_basis_finds_the_direction_where_harmful_inputs_dominate() -> None:
    gen = torch.Generator().manual_seed(0)
    d = 12
    benign = torch.randn(4000, d, generator=gen) * torch.linspace(3.0, 1.0, d)  # (n, d)
    harmful = torch.randn(4000, d, generator=gen) * torch.linspace(3.0, 1.0, d)
    harmful[:, 7] *= 6.0  # harmful inputs carry 36× the energy along e_7
    c_b, c_h = benign.T @ benign / len(benign), harmful.T @ harmful / len(harmful)

    basis = selective_basis(c_h, c_b, dims=1)  # (d, 1)

    assert basis.shape == (d, 1)
    direction = basis[:, 0] / basis[:, 0].norm()
    assert abs(float(direction[7])) > 0.99  # the planted direction, up to sign
    assert energy_ratio(harmful, basis) > 10 * energy_ratio(benign, basis)


def test_basis_whitens_benign_inputs_and_parametrisation_stays_inside() -> None:
    gen = torch.Generator().manual_seed(1)
    x_b, x_h = torch.randn(500, 9, generator=gen), torch.randn(500, 9, generator=gen) * 2
    c_b = x_b.T @ x_b / 500
    basis = selective_basis(x_h.T @ x_h / 500, c_b, dims=3)  # (9, 3)
    gram = basis.T @ c_b @ basis  # unit benign energy per coordinate (up to the ridge)
    assert torch.allclose(gram, torch.eye(3), atol=2e-2)

    lora_a = torch.nn.Linear(9, 4, bias=False)
    constrain_lora_inputs([(lora_a, basis)], seed=0)
    coords = lora_a.parametrizations.weight.original
    assert coords.shape == (4, 3) and coords.requires_grad
    assert torch.allclose(lora_a.weight, coords @ basis.T)
    assert torch.allclose(InSubspace(basis).right_inverse(lora_a.weight), coords, atol=1e-4)
    materialise_lora_inputs([lora_a])
    assert isinstance(lora_a.weight, torch.nn.Parameter) and lora_a.weight.shape == (4, 9)
    q, _ = torch.linalg.qr(basis)
    weight = lora_a.weight.detach()
    residual = weight - (weight @ q) @ q.T  # nothing outside span(basis)
    assert float(residual.abs().max()) < 1e-5


def test_moments_count_only_the_chosen_positions_and_share_inputs(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    names = ["layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.1.mlp.down_proj"]
    sequences = [[5, 6, 7, 8, 9], [10, 11, 12]]
    spans = [(1, 4), (0, 3)]
    collector = MomentCollector(model.model, names)
    collector.run(model.model, sequences, spans, pad_id=0)
    moments = collector.moments()

    assert moments[names[0]] is moments[names[1]]  # q and v read the same tensor
    seen: list[torch.Tensor] = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0][0])
    )
    with torch.no_grad():
        for seq, (lo, hi) in zip(sequences, spans, strict=True):
            model.model(input_ids=torch.tensor([seq]))
            seen[-1] = seen[-1][lo:hi]
    handle.remove()
    rows = torch.cat(seen).double()  # (6, d_ff)
    expected = rows.T @ rows / 6
    scale = float(expected.abs().max())  # batched (padded) vs single forwards differ by ~1e-7
    assert torch.allclose(moments[names[2]], expected, rtol=0, atol=1e-5 * scale)


def test_selective_training_keeps_every_lora_a_inside_its_subspace(
    tiny_model: Path, prompt_files: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors import safe_open

    from app.factory.train import train_patch
    from app.patches.metadata import PatchMetadata

    config = tiny_config(
        tiny_model,
        prompt_files,
        tmp_path / "sel",
        tmp_path / "cache",
        steps=4,
        batch_size=4,
        preserve_tokens=6,
        kl_top_k=8,
        selective_dims=2,
    )
    result = train_patch(config)
    assert result.final_loss < result.initial_loss
    with safe_open(str(result.out_dir / "adapter_model.safetensors"), framework="pt") as fh:
        names = fh.keys()  # safe_open is not iterable
        a_weights = {k: fh.get_tensor(k) for k in names if "lora_A" in k}
    assert a_weights
    for key, a in a_weights.items():  # (r, d) of rank ≤ dims: its rows span ≤ 2 directions
        singular = torch.linalg.svdvals(a.double())
        assert float(singular[2:].max()) < 1e-5 * float(singular[0]), key
    training = PatchMetadata.read(result.out_dir).training or {}
    assert training["selective_dims"] == 2
    with pytest.raises(ValueError, match="selective-dims needs preserving mode"):
        train_patch(replace(config, mode="safety-only", out_dir=tmp_path / "x", steps=1))
