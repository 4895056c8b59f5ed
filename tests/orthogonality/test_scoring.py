"""Adapter-level scores on the tiny Llama: in-span ≈ 1, orthogonal ≈ 0, random ≈ baseline."""

from __future__ import annotations

import json
import math

import pytest
import torch

from app.lora import config_rank_alpha, module_scaling
from app.lora import module_path as path_of
from app.orthogonality import linalg
from app.orthogonality.adapter import load_adapter
from app.orthogonality.interference import interference
from app.orthogonality.scoring import score_adapter
from tests.orthogonality.conftest import MODULES, module_path, random_factors, write_lora

R = 4


def _crafted(
    base_weights: dict[str, torch.Tensor], inside: bool, seed: int = 0, left_inside: bool = True
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A's rows and B's columns inside (or orthogonal to) the top-R singular subspaces;
    `left_inside=False` puts B's columns orthogonal to U₀ whatever A does."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in (0, 1):
        for kind in MODULES:
            module = module_path(layer, kind)
            W = base_weights[module + ".weight"].double()
            U, _, Vh = torch.linalg.svd(W, full_matrices=False)
            V0, U0 = Vh[:R].T, U[:, :R]
            if not inside:
                V0 = linalg.orthonormal_complement(V0, R, seed=seed)
                U0 = linalg.orthonormal_complement(U0, R, seed=seed + 1)
            if not left_inside:
                U0 = linalg.orthonormal_complement(U[:, :R], R, seed=seed + 1)
            A = torch.randn(R, R, generator=gen, dtype=torch.float64) @ V0.T  # [R, d_in]
            B = U0 @ torch.randn(R, R, generator=gen, dtype=torch.float64)  # [d_out, R]
            out[module] = (A, B)
    return out


@pytest.mark.parametrize("inside", [True, False])
def test_crafted_adapters_score_one_or_zero(tiny_model, base_weights, tmp_path, inside):
    adapter = write_lora(tmp_path / "a", _crafted(base_weights, inside), r=R, lora_alpha=8)
    score = score_adapter(adapter, tiny_model, cache_dir=tmp_path / "cache")
    expected = 1.0 if inside else 0.0
    assert len(score.modules) == 14
    for m in score.modules:
        for side in (m.right, m.left):
            assert side.phi == pytest.approx(expected, abs=1e-5), m.module
            assert side.energy == pytest.approx(expected, abs=1e-5), m.module
        assert m.method == "exact"
    summary = score.to_dict()
    assert summary["phi"] == pytest.approx(expected, abs=1e-5)
    assert summary["orthogonality"] == pytest.approx(1 - expected, abs=1e-5)
    assert all(row["phi"] == pytest.approx(expected, abs=1e-5) for row in summary["layers"])
    assert summary["left_phi"] == pytest.approx(expected, abs=1e-5)


def test_headline_is_the_right_side(tiny_model, base_weights, tmp_path):
    """A's rows in span(V₀), B's columns orthogonal to U₀: the paper's measure (right side,
    Sim = V_Δᵀ V₀) says φ = 1; the left side, reported beside it, says 0. A mean of the two
    (the old headline) would read 0.5."""
    factors = _crafted(base_weights, inside=True, left_inside=False)
    score = score_adapter(
        write_lora(tmp_path / "a", factors, r=R, lora_alpha=8),
        tiny_model,
        cache_dir=tmp_path / "cache",
    )
    summary = score.to_dict(detail=True)
    assert summary["phi"] == pytest.approx(1.0, abs=1e-5)
    assert summary["orthogonality"] == pytest.approx(0.0, abs=1e-5)
    assert summary["left_phi"] == pytest.approx(0.0, abs=1e-5)
    assert summary["left_orthogonality"] == pytest.approx(1.0, abs=1e-5)
    assert summary["phi"] == pytest.approx(summary["right"]["phi"])
    assert all(row["phi"] == pytest.approx(1.0, abs=1e-5) for row in summary["modules"])
    assert all(row["left_phi"] == pytest.approx(0.0, abs=1e-5) for row in summary["layers"])
    assert summary["worst_module"]["left_phi"] == pytest.approx(0.0, abs=1e-5)
    left = score.to_dict(detail=False, side="left")
    assert left["phi"] == pytest.approx(0.0, abs=1e-5) and "left_phi" not in left


def test_random_adapters_land_near_the_baseline(tiny_model, base_weights, tmp_path):
    """Seeded random adapters: ΔW-weighted φ / E[φ] (E[φ] = max(r, k)/d) averages 1 on both
    sides. One adapter's ratio has a spread of about ±0.09 here (d = 32..128, r = k = 4,
    14 modules), so the mean of 4 lies within 0.25 of 1 (5 σ); an in-span adapter's is ~16."""
    ratios = {"right": [], "left": []}
    for seed in range(4):
        adapter = write_lora(
            tmp_path / f"rand{seed}", random_factors(base_weights, R, seed=seed), r=R, lora_alpha=8
        )
        summary = score_adapter(adapter, tiny_model, cache_dir=tmp_path / "cache").to_dict()
        for side in ratios:
            ratios[side].append(summary[side]["phi"] / summary[side]["phi_baseline"])
    for side, values in ratios.items():
        assert abs(sum(values) / len(values) - 1) < 0.25, (side, values)


def test_peft_written_adapter_matches_peft_delta_weight(tiny_model, tmp_path):
    """Parsing + scaling (rank_pattern, alpha_pattern, rsLoRA) agree with peft's own ΔW."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 8},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
        use_rslora=True,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path / "peft")
    deltas = {
        name.removeprefix("base_model.model."): module.get_delta_weight("default")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A")
    }
    adapter = load_adapter(tmp_path / "peft")
    assert {path_of(w) for w in adapter.modules} == set(deltas) and len(deltas) == 6
    for weight, f in adapter.modules.items():
        d = linalg.lora_delta_svd(f.b, f.a, f.scaling)
        torch.testing.assert_close(
            (d.U * d.S) @ d.V.T, deltas[path_of(weight)].double(), atol=1e-5, rtol=1e-5
        )
    assert adapter.modules["model.layers.0.mlp.down_proj.weight"].rank == 8
    q1 = "model.layers.1.self_attn.q_proj.weight"
    assert (config_rank_alpha(adapter.config, q1)[0], module_scaling(adapter.config, q1)) == (
        4,
        3 / 2,
    )
    score = score_adapter(tmp_path / "peft", tiny_model, cache_dir=tmp_path / "cache")
    assert {m.k for m in score.modules} == {4, 8}  # k defaults to each module's rank


def test_bad_k_and_wrong_model_raise_value_error(tiny_model, base_weights, tmp_path):
    adapter = write_lora(tmp_path / "a", random_factors(base_weights, R, 0), r=R, lora_alpha=8)
    for k in (0, -3, 33):  # k_proj is 32 x 64
        with pytest.raises(ValueError, match="k must be"):
            score_adapter(adapter, tiny_model, k=k, cache_dir=tmp_path / "cache")
    wrong = {module_path(0, "q_proj"): (torch.randn(R, 48), torch.randn(64, R))}
    with pytest.raises(ValueError, match="wrong base model"):
        score_adapter(
            write_lora(tmp_path / "w", wrong, r=R, lora_alpha=8),
            tiny_model,
            cache_dir=tmp_path / "cache",
        )
    with pytest.raises(FileNotFoundError):
        score_adapter(tmp_path / "missing", tiny_model, cache_dir=tmp_path / "cache")


def test_explicit_k_lm_head_skipped_and_json_safe(tiny_model, base_weights, tmp_path):
    factors = random_factors(base_weights, R, 1, layers=(0,))
    factors["lm_head_missing"] = (torch.randn(R, 64), torch.randn(100, R))  # not in the model
    factors[module_path(1, "q_proj")] = (torch.randn(R, 64), torch.zeros(64, R))  # B = 0
    adapter = write_lora(tmp_path / "a", factors, r=R, lora_alpha=8)
    score = score_adapter(adapter, tiny_model, k=16, cache_dir=tmp_path / "cache")
    assert {m.k for m in score.modules} == {16}
    assert [s["module"] for s in score.skipped] == ["lm_head_missing"]
    full = score.to_dict(detail=True, side="both")
    text = json.dumps(full, allow_nan=False)  # NaN (the zero update) must become null
    zero = next(r for r in full["modules"] if r["module"] == module_path(1, "q_proj"))
    assert zero["phi"] is None and zero["delta_fro_sq"] == 0
    assert full["worst_module"]["module"] != module_path(1, "q_proj")
    # k = 16 > r = 4: the baseline is max(r, k)/d.
    q0 = next(r for r in full["modules"] if r["module"] == module_path(0, "q_proj"))
    assert q0["right"]["phi_baseline"] == pytest.approx(16 / 64)
    assert "layers.1" not in full["worst_module"]["module"] and len(text) > 1000
    right = score.to_dict(detail=False, side="right")
    assert "modules" not in right and right["phi"] == pytest.approx(full["right"]["phi"])
    with pytest.raises(ValueError, match="side"):
        score.to_dict(side="top")  # type: ignore[arg-type]


def test_interference_between_patches(base_weights, tmp_path):
    f1 = random_factors(base_weights, R, 1)
    f2 = random_factors(base_weights, R, 2)
    same_span = {
        m: (
            torch.randn(R, R, dtype=torch.float64) @ A.double(),
            B.double() @ torch.randn(R, R, dtype=torch.float64),
        )
        for m, (A, B) in f1.items()
    }
    only_q = {m: f for m, f in f2.items() if m.endswith("q_proj")}
    paths = {
        "p1": write_lora(tmp_path / "p1", f1, r=R, lora_alpha=8),
        "p1-mixed": write_lora(tmp_path / "p1b", same_span, r=R, lora_alpha=16),
        "p2-q": write_lora(tmp_path / "p2", only_q, r=R, lora_alpha=8),
    }
    rows = {(r["a"], r["b"]): r for r in interference(paths, detail=True)}
    assert set(rows) == {("p1", "p1-mixed"), ("p1", "p2-q"), ("p1-mixed", "p2-q")}
    same = rows[("p1", "p1-mixed")]
    assert same["shared_modules"] == 14 and same["phi"] == pytest.approx(1.0, abs=1e-6)
    indep = rows[("p1", "p2-q")]
    assert indep["shared_modules"] == 2 and len(indep["modules"]) == 2
    assert indep["phi_right"] < 0.5 and indep["phi_baseline_right"] == pytest.approx(R / 64)
    assert not math.isnan(indep["phi"])


def test_scoring_reads_leniently_where_serving_refuses(tiny_model, base_weights, tmp_path):
    """One reader (app.lora): a DoRA export with adapter-named keys is refused for serving but
    scored on its s·B·A, with what was left out listed as skipped."""
    from safetensors.torch import load_file, save_file

    from app.lora import LoraFormatError, read_lora_adapter

    factors = random_factors(base_weights, R, 3, layers=(0,))
    adapter = write_lora(tmp_path / "a", factors, r=R, lora_alpha=8, use_dora=True)
    tensors = {
        k.replace(".weight", ".default.weight"): v
        for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()
    }
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(R, 512)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(LoraFormatError):
        read_lora_adapter(adapter)
    score = score_adapter(adapter, tiny_model, cache_dir=tmp_path / "cache")
    assert len(score.modules) == len(factors)
    reasons = " ".join(s["reason"] for s in score.skipped)
    assert "DoRA" in reasons and "embedding" in reasons
