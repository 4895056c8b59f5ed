"""Grouped LoRA ops for vLLM's CPU (torch) punica path.

A batch of T token rows carries one adapter slot per row, s_t in {-1, 0, ..., S-1}; -1 is a
base-model row (no LoRA). With the stacked weights vLLM keeps per layer,

    A: (S, 1, r, d_in)  (``lora_a_stacked``)     B: (S, 1, d_out, r)  (``lora_b_stacked``)

the two halves of a LoRA delta are

    shrink:  y[t, :r]            = scale * x[t] @ A[s_t].T          (0 for s_t = -1)
    expand:  y[t, o : o + d_out] += x[t] @ B[s_t].T                  (row left alone for s_t = -1)

vLLM's torch fallback gathers ``W[s_t]`` for every row -- a (T, d_out, r) copy per module per
step, megabytes for a prefill -- and then runs a batched GEMV. Here the rows that share a slot
are one dense GEMM against that slot's matrix, ``y[rows] = x[rows] @ W[s].T``; base rows are
never computed; a slot whose rows are contiguous (a prefill sequence, a one-adapter batch) is
a view with no copy at all. The slot -> rows grouping (`SlotGroups`) depends only on the
batch's indices, so a caller can build it once per step and reuse it for every layer.

Numerics: base rows are exact (shrink writes 0.0; expand leaves them untouched, as the Triton
kernel and vLLM >= 0.33's torch ops do). LoRA rows equal the per-row reference to fp32
rounding only: a GEMM blocks its dot products differently from a batched GEMV.

The ``bgmv_*`` / ``sgmv_*`` functions have vLLM's op signatures (vLLM 0.32 and 0.33) and can
replace ``vllm.lora.ops.torch_ops`` one for one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Rows = slice | torch.Tensor  # a contiguous range of rows, or a 1-D long tensor of row ids


@dataclass(frozen=True)
class SlotGroups:
    """The rows of a batch grouped by adapter slot: ``groups[k] = (slot, rows)``, slot >= 0."""

    num_rows: int
    groups: tuple[tuple[int, Rows], ...]
    has_base_rows: bool

    @classmethod
    def from_segments(cls, slots: list[int], lengths: list[int]) -> SlotGroups:
        """Runs of equal slots (``slots[k]`` repeated ``lengths[k]`` times, in row order)."""
        spans: dict[int, list[tuple[int, int]]] = {}
        start = 0
        for slot, length in zip(slots, lengths, strict=True):
            if length > 0:
                spans.setdefault(slot, []).append((start, start + length))
            start += length
        groups: list[tuple[int, Rows]] = []
        for slot, runs in spans.items():
            if slot < 0:
                continue
            if len(runs) == 1:
                rows: Rows = slice(*runs[0])
            else:  # interleaved requests: one row-id tensor, still one GEMM for the slot
                rows = torch.tensor([row for lo, hi in runs for row in range(lo, hi)])
            groups.append((slot, rows))
        return cls(start, tuple(groups), any(slot < 0 for slot in spans))

    @classmethod
    def from_indices(cls, indices: torch.Tensor) -> SlotGroups:
        """From per-row slot indices (T,), -1 for base rows."""
        slots, lengths = torch.unique_consecutive(indices, return_counts=True)
        return cls.from_segments(slots.tolist(), lengths.tolist())


def _slot_matrix(stacked: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """(S, 1, m, k) or (S, m, k) -> slot's (m, k) matrix, a view unless a dtype cast is needed."""
    matrix = stacked[slot]
    if matrix.dim() == 3:
        matrix = matrix[0]
    return matrix.to(dtype=dtype)


def _take_rows(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def grouped_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    y: torch.Tensor,
    groups: SlotGroups,
    scale: float,
) -> None:
    """``y[t, :r] = scale * x[t] @ A[s_t].T``; 0.0 for base rows.

    x: (T, d_in); lora_a: (S, 1, r, d_in) or (S, r, d_in); y: (T, >= r), written in place.
    """
    x = x.to(dtype=y.dtype)
    target = y[:, : lora_a.shape[-2]]  # (T, r)
    if groups.has_base_rows:
        target.zero_()
    for slot, rows in groups.groups:
        a = _slot_matrix(lora_a, slot, y.dtype)  # (r, d_in)
        delta = torch.mm(_take_rows(x, rows), a.t())  # (rows, r)
        if scale != 1.0:
            delta.mul_(scale)
        if isinstance(rows, slice):
            target[rows] = delta
        else:
            target.index_copy_(0, rows, delta)


def grouped_expand(
    x: torch.Tensor,
    lora_b: torch.Tensor,
    y: torch.Tensor,
    groups: SlotGroups,
    offset: int,
    width: int,
    add_inputs: bool,
) -> None:
    """``y[t, offset : offset + n] (+)= x[t] @ B[s_t][:n].T`` with n = min(width, d_out);
    base rows are left untouched.

    x: (T, r); lora_b: (S, 1, d_out, r) or (S, d_out, r); y: (T, >= offset + n), in place.
    ``n`` < d_out when the adapter pads its output more than the model does.
    """
    x = x.to(dtype=y.dtype)
    width = min(width, lora_b.shape[-2])
    target = y[:, offset : offset + width]  # (T, n)
    for slot, rows in groups.groups:
        b = _slot_matrix(lora_b, slot, y.dtype)[:width]  # (n, r)
        xs = _take_rows(x, rows)  # (rows, r)
        if isinstance(rows, slice):
            if add_inputs:
                target[rows].addmm_(xs, b.t())
            else:
                target[rows] = torch.mm(xs, b.t())
        elif add_inputs:
            target.index_add_(0, rows, torch.mm(xs, b.t()))
        else:
            target.index_copy_(0, rows, torch.mm(xs, b.t()))


def grouped_lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: tuple[torch.Tensor, ...],
    lora_b: tuple[torch.Tensor, ...],
    scale: float,
    output_slices: tuple[int, ...],
    groups: SlotGroups,
    add_inputs: bool = True,
) -> None:
    """A whole LoRA linear layer (all its output slices, e.g. q/k/v) in one pass over the slots:

        y[t, o_i : o_i + n_i] (+)= (scale * x[t] @ A_i[s_t].T) @ B_i[s_t].T,  o_i = sum_{j<i} n_j

    x: (T, d_in); A_i: (S, 1, r, d_in); B_i: (S, 1, n_i, r); y: (T, >= sum n_i), in place.
    Per slot, its rows of x are gathered once (not once per slice and op) and its delta is
    written once: in place (``addmm_``) for a contiguous run of rows, else one ``index_add_``
    of all slices together. The rank-r intermediate is fp32, as vLLM's shrink buffer.
    """
    total = sum(output_slices)
    target = y[:, :total]  # (T, sum n_i)
    x = x.to(dtype=torch.float32)
    for slot, rows in groups.groups:
        xs = _take_rows(x, rows)  # (rows, d_in)
        deltas: list[torch.Tensor] = []
        offset = 0
        for a_stacked, b_stacked, width in zip(lora_a, lora_b, output_slices, strict=True):
            h = torch.mm(xs, _slot_matrix(a_stacked, slot, torch.float32).t())  # (rows, r)
            if scale != 1.0:
                h.mul_(scale)
            b = _slot_matrix(b_stacked, slot, y.dtype)[:width]  # (n_i, r)
            h = h.to(dtype=y.dtype)
            if isinstance(rows, slice):
                out = target[rows, offset : offset + b.shape[0]]
                if add_inputs:
                    out.addmm_(h, b.t())
                else:
                    out.copy_(torch.mm(h, b.t()))
            else:
                deltas.append(torch.mm(h, b.t()))  # (rows, n_i)
            offset += width
        if deltas:
            delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=1)
            if add_inputs:
                target.index_add_(0, rows, delta)
            else:
                target.index_copy_(0, rows, delta)


# vLLM's op signatures (vllm/lora/ops/torch_ops/lora_ops.py, unchanged from 0.32 to 0.33).
# The weight argument is called lora_b_weights in vLLM's bgmv_shrink too, although it holds A.


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    groups = SlotGroups.from_indices(lora_indices_tensor)
    grouped_shrink(inputs, lora_b_weights, output_tensor, groups, scaling)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    rows = output_tensor.shape[0]
    if inputs.shape[0] == 1 and rows != 1:
        # vLLM's op broadcasts a one-row delta over every output row; keep that contract.
        slot = int(lora_indices_tensor[0])
        inputs = inputs.expand(rows, -1)
        lora_indices_tensor = torch.full((rows,), slot, dtype=torch.long)
    groups = SlotGroups.from_indices(lora_indices_tensor)
    grouped_expand(
        inputs, lora_b_weights, output_tensor, groups, 0, output_tensor.shape[1], add_inputs
    )


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    groups = SlotGroups.from_indices(lora_indices_tensor)
    grouped_expand(
        inputs, lora_b_weights, output_tensor, groups, slice_offset, slice_size, add_inputs
    )


def _segment_groups(seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor) -> SlotGroups:
    # The sgmv metadata already is the run-length form of the per-row indices.
    return SlotGroups.from_segments(lora_indices_tensor.tolist(), seq_len_tensor.tolist())


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    groups = _segment_groups(seq_len_tensor, lora_indices_tensor)
    grouped_shrink(inputs, lora_a_weights, output_tensor, groups, scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    groups = _segment_groups(seq_len_tensor, lora_indices_tensor)
    grouped_expand(
        inputs, lora_b_weights, output_tensor, groups, 0, output_tensor.shape[1], add_inputs
    )


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    groups = _segment_groups(seq_len_tensor, lora_indices_tensor)
    grouped_expand(
        inputs, lora_b_weights, output_tensor, groups, slice_offset, slice_size, add_inputs
    )
