"""Fixtures: a tiny random Llama (shared per session) and PEFT-format LoRA adapter writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.support.tiny_model import build_tiny_llama

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_path(layer: int, kind: str) -> str:
    block = "mlp" if kind in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{block}.{kind}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def base_weights(tiny_model: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(tiny_model / "model.safetensors"), framework="pt") as fh:
        return {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118


def write_lora(
    adapter_dir: Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    r: int,
    lora_alpha: float,
    **config: object,
) -> Path:
    """Write {module: (A [r, d_in], B [d_out, r])} as PEFT's save_pretrained lays it out."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.float().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.float().contiguous()
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": lora_alpha,
                "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
                "rank_pattern": {},
                "alpha_pattern": {},
                "use_rslora": False,
                **config,
            }
        )
    )
    return adapter_dir


def random_factors(
    base_weights: dict[str, torch.Tensor], r: int, seed: int, layers: tuple[int, ...] = (0, 1)
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        for kind in MODULES:
            module = module_path(layer, kind)
            d_out, d_in = base_weights[module + ".weight"].shape
            out[module] = (
                torch.randn(r, d_in, generator=gen),
                torch.randn(d_out, r, generator=gen),
            )
    return out
