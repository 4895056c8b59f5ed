"""Exact stacking: ΔW of the combined adapter equals Σ sᵢBᵢAᵢ, and outputs match merged weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from app.constants import CONFIG_FILE
from app.lora import read_lora_adapter
from app.patches.metadata import weights_sha256
from app.patches.stacking import (
    StackingError,
    combine_adapters,
    combined_name,
    combined_rank,
)
from tests.support.lora_adapters import make_lora_adapter

ORDER = ("plain", "rslora", "pattern", "partial")
# PEFT's "cat" copies the first adapter's config (so rsLoRA must not come first) and fails on
# modules that no input has, as happens with layers_to_transform: compare it on the first three.
CAT_ORDER = ORDER[:3]
PROMPTS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64], [1, 2, 3, 4, 250, 180, 33, 8]])  # (2, 8)


def _base(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _peft_with(model_dir: Path, dirs: list[Path]) -> PeftModel:
    model = PeftModel.from_pretrained(_base(model_dir), dirs[0], adapter_name="p0")
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(d, adapter_name=f"p{i}")
    return model.eval()


def peft_deltas(model_dir: Path, dirs: list[Path]) -> list[dict[str, torch.Tensor]]:
    """Reference ΔW per adapter from PEFT's get_delta_weight: [{weight name: (d_out, d_in)}]."""
    model = _peft_with(model_dir, dirs)
    deltas: list[dict[str, torch.Tensor]] = [{} for _ in dirs]
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weight = name.removeprefix("base_model.model.") + ".weight"
            for adapter in module.lora_A:
                deltas[int(adapter[1:])][weight] = module.get_delta_weight(adapter).detach()
    return deltas


@pytest.fixture(scope="module")
def stacked(adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stacks") / "stack-all"
    return combine_adapters([adapters[k] for k in ORDER], out)


def test_combined_delta_equals_sum_of_scaled_deltas(
    tiny_model: Path, adapters: dict[str, Path], stacked: Path
) -> None:
    reference = peft_deltas(tiny_model, [adapters[k] for k in ORDER])
    combined = read_lora_adapter(stacked)
    union = set().union(*reference)
    assert set(combined.modules) == union
    assert len(union) == 12  # q, v, o, down, gate × 2 layers; k, up in layer 1 only
    for name in sorted(union):
        expected = sum(d[name] for d in reference if name in d)  # Σ sᵢBᵢAᵢ, (d_out, d_in)
        got = combined.modules[name].delta()  # B_cat @ A_cat, (d_out, d_in)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
        assert combined.modules[name].scaling == 1.0


def test_lora_io_scaling_matches_peft(tiny_model: Path, adapters: dict[str, Path]) -> None:
    reference = peft_deltas(tiny_model, [adapters[k] for k in ORDER])
    for key, ref in zip(ORDER, reference, strict=True):
        ours = read_lora_adapter(adapters[key])
        assert set(ours.modules) == set(ref)
        for name, module in ours.modules.items():
            torch.testing.assert_close(module.delta(), ref[name], rtol=1e-5, atol=1e-6)
    pattern = read_lora_adapter(adapters["pattern"]).modules
    assert pattern["model.layers.1.self_attn.q_proj.weight"].rank == 1
    assert pattern["model.layers.0.self_attn.q_proj.weight"].scaling == pytest.approx(5 / 3)
    assert pattern["model.layers.0.mlp.gate_proj.weight"].scaling == pytest.approx(2 / 3)
    rs = read_lora_adapter(adapters["rslora"]).modules["model.layers.1.mlp.down_proj.weight"]
    assert rs.scaling == pytest.approx(6 / 2**0.5)


def test_combined_config(adapters: dict[str, Path], stacked: Path) -> None:
    config = json.loads((stacked / CONFIG_FILE).read_text())
    rank = 4 + 2 + 3 + 2
    assert combined_rank([adapters[k] for k in ORDER]) == rank
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (rank, rank, False)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    combined = read_lora_adapter(stacked)
    assert config["target_modules"] == sorted(n.removesuffix(".weight") for n in combined.modules)
    leaves = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert combined.target_modules == leaves
    assert {m.rank for m in combined.modules.values()} == {rank}
    # blocks: plain 0:4, rslora 4:6, pattern 6:9, partial 9:11; layer-0 q_proj has plain + pattern
    q0 = combined.modules["model.layers.0.self_attn.q_proj.weight"]
    assert q0.b[:, 4:6].abs().max() == 0 and q0.b[:, 9:].abs().max() == 0  # (64, 11)
    assert q0.a[4:6].abs().max() == 0 and q0.a[9:].abs().max() == 0  # (11, 64)
    assert q0.b[:, :4].abs().max() > 0 and q0.b[:, 6:9].abs().max() > 0
    # layer-1 q_proj has rank 1 in "pattern": the rest of that block (columns 7:9) is zero
    q1 = combined.modules["model.layers.1.self_attn.q_proj.weight"]
    assert q1.b[:, 6].abs().max() > 0 and q1.b[:, 7:9].abs().max() == 0


def test_stacked_outputs_equal_merged_weights_and_peft_cat(
    tiny_model: Path, adapters: dict[str, Path], stacked: Path, tmp_path: Path
) -> None:
    dirs = [adapters[k] for k in ORDER]
    deltas = peft_deltas(tiny_model, dirs)
    merged = _base(tiny_model)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for delta in deltas:
            for name, dw in delta.items():
                params[name] += dw  # W + Σ ΔWᵢ, fp32
    ours = PeftModel.from_pretrained(_base(tiny_model), stacked).eval()
    cat_stacked = combine_adapters([adapters[k] for k in CAT_ORDER], tmp_path / "cat-ours")
    ours_cat = PeftModel.from_pretrained(_base(tiny_model), cat_stacked).eval()
    cat = _peft_with(tiny_model, [adapters[k] for k in CAT_ORDER])
    cat.add_weighted_adapter(["p0", "p1", "p2"], [1.0, 1.0, 1.0], "cat", combination_type="cat")
    cat.set_adapter("cat")
    with torch.no_grad():
        base_logits = _base(tiny_model)(PROMPTS).logits  # (2, 8, vocab)
        merged_logits = merged(PROMPTS).logits
        our_logits = ours(PROMPTS).logits
        cat_logits = cat(PROMPTS).logits
        our_cat_logits = ours_cat(PROMPTS).logits
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the patches do change outputs
    torch.testing.assert_close(our_logits, merged_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(our_cat_logits, cat_logits, rtol=1e-4, atol=1e-4)
    assert (our_cat_logits - our_logits).abs().max() > 1e-3  # "partial" matters

    gen = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = merged.generate(input_ids=PROMPTS, attention_mask=torch.ones_like(PROMPTS), **gen)
        got = ours.generate(input_ids=PROMPTS, attention_mask=torch.ones_like(PROMPTS), **gen)
    assert torch.equal(got, want)


def test_stack_order_does_not_change_delta(adapters: dict[str, Path], tmp_path: Path) -> None:
    one = read_lora_adapter(
        combine_adapters([adapters["plain"], adapters["rslora"]], tmp_path / "a")
    )
    two = read_lora_adapter(
        combine_adapters([adapters["rslora"], adapters["plain"]], tmp_path / "b")
    )
    assert set(one.modules) == set(two.modules)
    for name in one.modules:
        torch.testing.assert_close(one.modules[name].delta(), two.modules[name].delta())


def test_single_adapter_is_normalised(adapters: dict[str, Path], tmp_path: Path) -> None:
    """combine_adapters([x]) folds per-module scalings into B: same ΔW, no patterns, scaling 1."""
    out = combine_adapters([adapters["pattern"]], tmp_path / "norm")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["r"] == config["lora_alpha"] == 3 and config["rank_pattern"] == {}
    source, normal = read_lora_adapter(adapters["pattern"]), read_lora_adapter(out)
    for name, module in source.modules.items():
        torch.testing.assert_close(normal.modules[name].delta(), module.delta())


def test_combined_name_is_stable_and_order_independent() -> None:
    name = combined_name(["b", "a"], ["2" * 64, "1" * 64])
    assert name == combined_name(["a", "b"], ["1" * 64, "2" * 64])
    assert name.startswith("stack-") and len(name) == len("stack-") + 16
    assert name != combined_name(["a", "b"], ["1" * 64, "3" * 64])  # new weights, new name
    with pytest.raises(ValueError):
        combined_name(["a", "a"], ["1", "1"])
    with pytest.raises(ValueError):
        combined_name(["a"], [])


def test_existing_output_is_replaced_atomically(adapters: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "stack"
    combine_adapters([adapters["plain"]], out)
    combine_adapters([adapters["plain"], adapters["rslora"]], out)
    assert json.loads((out / CONFIG_FILE).read_text())["r"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack"]  # no temp dirs left over
    meta = json.loads(read_safetensors_metadata(out)["safepatch_stack_of"])
    assert meta == [weights_sha256(adapters["plain"]), weights_sha256(adapters["rslora"])]


def read_safetensors_metadata(adapter_dir: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as fh:
        return fh.metadata()


@pytest.mark.parametrize(
    "edit",
    [
        {"use_dora": True},
        {"modules_to_save": ["lm_head"]},
        {"bias": "lora_only"},
        {"init_lora_weights": "pissa"},
    ],
)
def test_refuses_unstackable_features(
    adapters: dict[str, Path], valid_adapter: Path, tmp_path: Path, edit: dict
) -> None:
    config = json.loads((valid_adapter / CONFIG_FILE).read_text())
    (valid_adapter / CONFIG_FILE).write_text(json.dumps({**config, **edit}))
    out = tmp_path / "out"
    with pytest.raises(StackingError, match="unsupported LoRA features"):
        combine_adapters([adapters["rslora"], valid_adapter], out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["candidate"]  # nothing half-written


def test_refuses_real_dora_adapter(tiny_model: Path, adapters: dict[str, Path], tmp_path: Path):
    dora = make_lora_adapter(
        tiny_model, tmp_path / "dora", r=2, alpha=4, target_modules=["q_proj"], use_dora=True
    )
    with pytest.raises(StackingError, match="DoRA"):
        combine_adapters([adapters["plain"], dora], tmp_path / "out")
