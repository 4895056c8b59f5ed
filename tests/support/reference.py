"""HF transformers (+ peft) greedy references, fp32 on CPU, to check vLLM's output against."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def chat_prompt_ids(model_dir: Path, user: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def load_model(model_dir: Path, adapters: Sequence[Path] = ()) -> torch.nn.Module:
    """The base model with each adapter's ΔW = s·B·A merged into its weights (fp32)."""
    from transformers import AutoModelForCausalLM

    from app.lora import read_lora_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for adapter_dir in adapters:
            for name, module in read_lora_adapter(adapter_dir).modules.items():
                weights[name] += module.delta()  # (d_out, d_in)
    return model


def load_peft(model_dir: Path, adapter: Path) -> torch.nn.Module:
    """The base model wrapped by peft with one adapter (unmerged: peft's own LoRA forward)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).eval()


def greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])  # (1, prompt_len)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens
        )  # (1, prompt_len + new)
    return out[0, len(prompt_ids) :].tolist()
