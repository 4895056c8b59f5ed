"""Reading and writing PEFT LoRA dirs: scalings, patterns, dtypes, header-only rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from app.constants import CONFIG_FILE, WEIGHTS_FILE
from app.lora import (
    LoraAdapter,
    LoraFormatError,
    LoraModule,
    adapter_rank,
    read_lora_adapter,
    split_keys,
    write_lora_adapter,
)
from app.patches.stacking import combine_adapters, combined_rank


def test_write_keeps_mixed_ranks_and_delta_under_peft(
    tiny_model: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """Writing the 'pattern' adapter keeps rank 1 on one module via an escaped rank_pattern, folds
    every scaling into B, and PEFT reads back the same ΔW for every module."""
    source = read_lora_adapter(adapters["pattern"])
    out = write_lora_adapter(source, tmp_path / "copy")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["r"] == config["lora_alpha"] == 3
    assert config["rank_pattern"] == {r"model\.layers\.1\.self_attn\.q_proj": 1}
    assert config["alpha_pattern"] == config["rank_pattern"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    seen = 0
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weight = name.removeprefix("base_model.model.") + ".weight"
            assert module.scaling["default"] == 1.0
            got = module.get_delta_weight("default").detach()  # (d_out, d_in)
            torch.testing.assert_close(got, source.modules[weight].delta())
            seen += 1
    assert seen == len(source.modules) == 4


def test_stacking_promotes_dtypes(adapters: dict[str, Path], tmp_path: Path) -> None:
    half = tmp_path / "half"
    half.mkdir()
    (half / CONFIG_FILE).write_text((adapters["rslora"] / CONFIG_FILE).read_text())
    tensors = {
        k: v.to(torch.bfloat16) for k, v in load_file(adapters["rslora"] / WEIGHTS_FILE).items()
    }
    save_file(tensors, str(half / WEIGHTS_FILE))
    both = read_lora_adapter(combine_adapters([half, adapters["plain"]], tmp_path / "mix"))
    assert {m.a.dtype for m in both.modules.values()} == {torch.float32}
    only = read_lora_adapter(combine_adapters([half], tmp_path / "bf16"))
    assert {m.b.dtype for m in only.modules.values()} == {torch.bfloat16}
    source = read_lora_adapter(half)
    for name, module in source.modules.items():  # s·B rounded to bf16 once
        torch.testing.assert_close(only.modules[name].delta(), module.delta(), rtol=2e-2, atol=1e-3)


def test_header_only_ranks(adapters: dict[str, Path]) -> None:
    assert adapter_rank(adapters["pattern"]) == 3
    assert adapter_rank(adapters["partial"]) == 2
    assert combined_rank([adapters["plain"], adapters["pattern"]]) == 7


def test_split_keys() -> None:
    a = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    b = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    lone = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    pairs, unexpected = split_keys(
        [a, b, lone, "base_model.model.lora_A.weight", "x.lora_A.weight"]
    )
    assert pairs == {"model.layers.0.mlp.up_proj.weight": (a, b)}
    assert unexpected == sorted([lone, "base_model.model.lora_A.weight", "x.lora_A.weight"])


def test_read_refuses_unsupported_and_non_lora(valid_adapter: Path) -> None:
    config = json.loads((valid_adapter / CONFIG_FILE).read_text())
    (valid_adapter / CONFIG_FILE).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LoraFormatError) as info:
        read_lora_adapter(valid_adapter)
    assert info.value.code == "unsupported_feature"
    (valid_adapter / CONFIG_FILE).write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(LoraFormatError) as info:
        read_lora_adapter(valid_adapter)
    assert info.value.code == "not_lora"


def test_write_requires_modules(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_lora_adapter(LoraAdapter({}), tmp_path / "empty")
    mod = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 0.5)  # A (2, 3), B (4, 2)
    torch.testing.assert_close(mod.delta(), torch.full((4, 3), 1.0))  # 0.5 · 2
