"""Helpers for tests and benchmarks: make real PEFT LoRA adapters with non-zero updates."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def make_lora_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    r: int,
    alpha: float,
    target_modules: Sequence[str],
    use_rslora: bool = False,
    seed: int = 0,
    init_scale: float = 0.05,
    **config_kwargs: Any,
) -> Path:
    """Save a PEFT LoRA adapter for the model in `model_dir` to `out_dir` and return `out_dir`.

    Every lora_A / lora_B factor is drawn i.i.d. N(0, init_scale²) from a generator seeded with
    `seed` (in sorted parameter-name order), so B ≠ 0 and the adapter changes the model's outputs
    (PEFT's default init has B = 0, i.e. ΔW = 0). Extra keyword arguments go to `LoraConfig`
    (e.g. rank_pattern, alpha_pattern, layers_to_transform, use_dora)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        lora_dropout=0.0,
        **config_kwargs,
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                noise = torch.randn(param.shape, generator=generator)  # same shape as the factor
                param.copy_(noise * init_scale)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir)
    return out_dir
