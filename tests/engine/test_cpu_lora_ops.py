"""Grouped CPU LoRA ops equal the dense per-row reference ``x @ A.T @ B.T * scale``.

Exactness: base rows (-1) are bit-exact (shrink writes 0.0, expand leaves the row as it was);
the sgmv (segment) and bgmv (per-row) forms are bit-exact with each other (same grouping);
LoRA rows equal the reference to fp32 rounding (a GEMM sums in a different order than a
per-row GEMV), checked with a tolerance.
"""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops as vllm_ops

from app.engine import cpu_lora_ops as ops
from app.engine.cpu_lora_ops import SlotGroups

SLOTS = 4
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, scale: float
) -> torch.Tensor:
    """Dense per-row LoRA delta: row t gets ``x[t] @ A[s].T @ B[s].T * scale``, 0 for -1."""
    out = torch.zeros(x.shape[0], b.shape[-2], dtype=torch.float64)
    for t, slot in enumerate(indices.tolist()):
        if slot >= 0:
            out[t] = x[t].double() @ a[slot, 0].double().T @ b[slot, 0].double().T * scale
    return out


def _indices(generator: torch.Generator, tokens: int, pattern: str) -> torch.Tensor:
    if pattern == "base-only":
        return torch.full((tokens,), -1)
    if pattern == "one-slot":
        return torch.full((tokens,), 2)
    if pattern == "segments":  # prefill-like runs: one request after the other
        cuts = sorted(torch.randint(1, tokens, (3,), generator=generator).tolist())
        slots = [1, -1, 3, 1]
        return torch.cat(
            [
                torch.full((hi - lo,), s)
                for s, lo, hi in zip(slots, [0, *cuts], [*cuts, tokens], strict=True)
            ]
        )
    # "mixed": decode-like, every row its own request, slots interleaved with base rows
    return torch.randint(-1, SLOTS, (tokens,), generator=generator)


@pytest.mark.parametrize("pattern", ["mixed", "segments", "one-slot", "base-only"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shrink_then_expand_slices_equal_reference(pattern: str, seed: int) -> None:
    """A qkv-like layer: three output slices of different widths, y padded on the right."""
    gen = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(1, 40, (1,), generator=gen))
    d_in, rank, scale = 48, 8, 0.75
    widths = (32, 16, 16)
    indices = _indices(gen, tokens, pattern)
    x = torch.randn(tokens, d_in, generator=gen)
    a = [torch.randn(SLOTS, 1, rank, d_in, generator=gen) for _ in widths]
    b = [torch.randn(SLOTS, 1, w, rank, generator=gen) for w in widths]
    y_before = torch.randn(tokens, sum(widths) + 5, generator=gen)  # +5: padded output
    y = y_before.clone()
    groups = SlotGroups.from_indices(indices)
    offset = 0
    for a_slice, b_slice, width in zip(a, b, widths, strict=True):
        buffer = torch.full((tokens, rank), float("nan"))  # shrink must overwrite every row
        ops.grouped_shrink(x, a_slice, buffer, groups, scale)
        ops.grouped_expand(buffer, b_slice, y, groups, offset, width, add_inputs=True)
        expected = _reference(x, a_slice, b_slice, indices, scale)
        got = y[:, offset : offset + width].double() - y_before[:, offset : offset + width]
        torch.testing.assert_close(got, expected, **TOL)
        offset += width
    base = indices < 0
    assert torch.equal(y[base], y_before[base])  # bit-exact: base rows untouched
    assert torch.equal(y[:, offset:], y_before[:, offset:])  # padding untouched


@pytest.mark.parametrize("seed", [0, 1])
def test_bgmv_ops_equal_vllm_ops_on_lora_rows(seed: int) -> None:
    """Same results as vLLM's own torch ops wherever those are right (rows with a slot)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, d_in, rank, d_out = 17, 40, 8, 24
    indices = _indices(gen, tokens, "mixed")
    clamped = indices.clamp(min=0)  # what vLLM computes correctly
    lora = indices >= 0
    x = torch.randn(tokens, d_in, generator=gen)
    a = torch.randn(SLOTS, 1, rank, d_in, generator=gen)
    b = torch.randn(SLOTS, 1, d_out, rank, generator=gen)

    ours, theirs = torch.full((tokens, rank), 9.0), torch.full((tokens, rank), 9.0)
    ops.bgmv_shrink(x, a, ours, indices, 0.5)
    vllm_ops.bgmv_shrink(x, a, theirs, clamped, 0.5)
    torch.testing.assert_close(ours[lora], theirs[lora], **TOL)
    assert torch.equal(ours[~lora], torch.zeros_like(ours[~lora]))

    h = torch.randn(tokens, rank, generator=gen)
    for add in (True, False):
        y0 = torch.randn(tokens, d_out + 3, generator=gen)  # model pads more than the adapter
        ours, theirs = y0.clone(), y0.clone()
        ops.bgmv_expand(h, b, ours, indices, add_inputs=add)
        vllm_ops.bgmv_expand(h, b, theirs, clamped, add_inputs=add)
        torch.testing.assert_close(ours[lora], theirs[lora], **TOL)
        assert torch.equal(ours[~lora], y0[~lora])
        ours, theirs = y0.clone(), y0.clone()
        ops.bgmv_expand_slice(h, b[:, :, :10], ours, indices, 2, 10, add_inputs=add)
        vllm_ops.bgmv_expand_slice(h, b[:, :, :10], theirs, clamped, 2, 10, add_inputs=add)
        torch.testing.assert_close(ours[lora], theirs[lora], **TOL)
        assert torch.equal(ours[~lora], y0[~lora])


def test_bgmv_expand_broadcasts_one_row_like_vllm() -> None:
    h, b = torch.randn(1, 4), torch.randn(2, 1, 6, 4)
    ours, theirs = torch.ones(3, 6), torch.ones(3, 6)
    ops.bgmv_expand(h, b, ours, torch.tensor([1]), add_inputs=True)
    vllm_ops.bgmv_expand(h, b, theirs, torch.tensor([1]), add_inputs=True)
    torch.testing.assert_close(ours, theirs, **TOL)
    untouched = torch.ones(3, 6)
    ops.bgmv_expand(h, b, untouched, torch.tensor([-1]), add_inputs=True)
    assert torch.equal(untouched, torch.ones(3, 6))


def test_sgmv_forms_equal_bgmv_forms_bit_exact() -> None:
    gen = torch.Generator().manual_seed(3)
    slots, lengths = torch.tensor([2, -1, 0, 2]), torch.tensor([5, 3, 4, 2])
    indices = torch.repeat_interleave(slots, lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    meta = (starts, lengths, slots, 4, 5, int(lengths.sum()))
    x = torch.randn(14, 32, generator=gen)
    a, b = torch.randn(SLOTS, 1, 8, 32, generator=gen), torch.randn(SLOTS, 1, 20, 8, generator=gen)
    seg, row = torch.zeros(14, 8), torch.zeros(14, 8)
    ops.sgmv_shrink(x, a, seg, *meta, 0.3)
    ops.bgmv_shrink(x, a, row, indices, 0.3)
    assert torch.equal(seg, row)
    y_seg, y_row = torch.randn(14, 30, generator=gen), None
    y_row = y_seg.clone()
    ops.sgmv_expand(seg, b, y_seg, *meta, True)
    ops.bgmv_expand(row, b, y_row, indices, True)
    assert torch.equal(y_seg, y_row)
    ops.sgmv_expand_slice(seg, b, y_seg, *meta, 7, 20, False)
    ops.bgmv_expand_slice(row, b, y_row, indices, 7, 20, False)
    assert torch.equal(y_seg, y_row)


def test_slot_groups_use_views_for_runs_and_one_gemm_per_slot() -> None:
    groups = SlotGroups.from_indices(torch.tensor([1, 1, 1, -1, 0, 1, 0]))
    assert groups.num_rows == 7 and groups.has_base_rows
    by_slot = dict(groups.groups)
    assert set(by_slot) == {0, 1}  # one entry (one GEMM) per slot, none for -1
    assert torch.equal(by_slot[1], torch.tensor([0, 1, 2, 5]))
    assert torch.equal(by_slot[0], torch.tensor([4, 6]))
    run = SlotGroups.from_indices(torch.tensor([-1, -1, 3, 3, 3]))
    assert run.groups == ((3, slice(2, 5)),)  # a contiguous run: a view, no gather
    assert SlotGroups.from_indices(torch.tensor([-1, -1])).groups == ()
