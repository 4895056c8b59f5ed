"""The plugin installs the grouped ops into vLLM (ops and CPU punica wrapper), checks vLLM's
signatures first, and vLLM's own wrapper then computes the reference LoRA delta."""

from __future__ import annotations

import types

import pytest
import torch
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from app.engine import cpu_lora_fix, cpu_lora_ops

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def registered() -> None:
    assert cpu_lora_fix.register() is True
    assert cpu_lora_fix.register() is True  # idempotent


def test_register_replaces_vllm_ops_and_wrapper(registered: None) -> None:
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink"):
        assert getattr(lora_ops, name) is getattr(cpu_lora_ops, name)
        assert getattr(punica_cpu, name) is getattr(cpu_lora_ops, name)
    assert getattr(PunicaWrapperCPU._shrink_prefill, "__safepatch__", False)
    assert getattr(PunicaWrapperCPU.update_metadata, "__safepatch__", False)
    assert getattr(PunicaWrapperCPU.add_lora_linear, "__safepatch__", False)


def test_switch_off_leaves_vllm_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEPATCH_CPU_LORA_FIX", "0")
    assert cpu_lora_fix.register() is False


def test_unexpected_op_signature_is_left_alone() -> None:
    def bgmv_shrink(inputs, weights, output, indices, scaling=1.0, extra=None):  # noqa: ANN001,ANN202
        return None

    fake_ops = types.SimpleNamespace(**{n: getattr(lora_ops, n) for n in cpu_lora_fix.EXPECTED_OPS})
    fake_ops.bgmv_shrink = bgmv_shrink
    fake_punica = types.SimpleNamespace()
    assert cpu_lora_fix.install_ops(fake_ops, fake_punica) is False
    assert fake_ops.bgmv_shrink is bgmv_shrink and fake_ops.sgmv_shrink is lora_ops.sgmv_shrink


def test_unexpected_wrapper_signature_is_left_alone() -> None:
    class Wrapper:
        def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):  # noqa: ANN001,ANN003,ANN201
            return None

        def _shrink_prefill(self, y, x, w_t_all, scale, new_argument):  # noqa: ANN001,ANN201
            return None

    original = Wrapper._shrink_prefill
    assert cpu_lora_fix.install_wrapper(Wrapper) is False
    assert Wrapper._shrink_prefill is original


@pytest.mark.parametrize(
    "lora_ids",
    [
        [1, 1, 1, 0, 0, 2, 2, 2, 2, 3],  # prefill-like runs, base rows in the middle
        [2, 0, 1, 2, 4, 0, 1, 4],  # decode-like: interleaved, every slot filled
        [0, 0, 0],  # base only: no LoRA work at all
    ],
)
def test_wrapper_add_lora_linear_equals_reference(registered: None, lora_ids: list[int]) -> None:
    """vLLM's `PunicaWrapperCPU.add_lora_linear` (patched) on a qkv-like 3-slice layer."""
    gen = torch.Generator().manual_seed(len(lora_ids))
    tokens, d_in, rank, slots, scale = len(lora_ids), 32, 8, 4, 2.0
    widths = (24, 8, 8)
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=8, device="cpu")
    lora_index_to_id = [1, 2, 3, 4]  # slot k holds LoRA id k + 1; id 0 means no LoRA
    mapping = LoRAMapping(tuple(lora_ids), tuple(lora_ids), is_prefill=True)
    wrapper.update_metadata(mapping, lora_index_to_id, slots, 100)
    x = torch.randn(tokens, d_in, generator=gen)
    a = tuple(torch.randn(slots, 1, rank, d_in, generator=gen) for _ in widths)
    b = tuple(torch.randn(slots, 1, w, rank, generator=gen) for w in widths)
    y0 = torch.randn(tokens, sum(widths), generator=gen)
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a, b, scale, widths)  # fused: all slices per slot
    y_split = y0.clone()  # the per-slice path that row/column-parallel layers take
    buffers = tuple(torch.zeros(tokens, rank) for _ in widths)
    wrapper.add_shrink(buffers, x, a, scale)
    wrapper.add_expand(y_split, buffers, b, widths, add_inputs=True)

    expected = y0.double().clone()
    columns = torch.split(torch.arange(sum(widths)), widths)
    for t, lora_id in enumerate(lora_ids):
        if lora_id:
            s = lora_id - 1
            for a_i, b_i, cols in zip(a, b, columns, strict=True):
                expected[t, cols] += (
                    x[t].double() @ a_i[s, 0].double().T @ b_i[s, 0].double().T * scale
                )
    torch.testing.assert_close(y.double(), expected, **TOL)
    torch.testing.assert_close(y_split.double(), expected, **TOL)
    base = torch.tensor(lora_ids) == 0
    assert torch.equal(y[base], y0[base]) and torch.equal(y_split[base], y0[base])


def test_zero_slots_are_skipped_until_their_weights_are_written(registered: None) -> None:
    """A slot zeroed in this layer (adapter does not touch it) adds nothing; once vLLM copies
    weights into it in place, the cached zero flag is stale and the slot is computed again."""
    wrapper = PunicaWrapperCPU(max_num_batched_tokens=16, max_batches=4, device="cpu")
    ids = (1, 2, 1, 0)
    wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=True), [1, 2], 2, 100)
    a = (torch.zeros(2, 1, 4, 8),)
    b = (torch.randn(2, 1, 6, 4),)
    x, y0 = torch.randn(4, 8), torch.randn(4, 6)
    y = y0.clone()
    wrapper.add_lora_linear(y, x, a, b, 1.0, (6,))
    assert torch.equal(y, y0)
    assert cpu_lora_fix.slot_is_zero(a[0], 0) and cpu_lora_fix.slot_is_zero(a[0], 1)
    a[0][0, 0].copy_(torch.randn(4, 8))  # what set_lora does
    assert not cpu_lora_fix.slot_is_zero(a[0], 0) and cpu_lora_fix.slot_is_zero(a[0], 1)
    wrapper.add_lora_linear(y, x, a, b, 1.0, (6,))
    expected = y0.clone()
    expected[[0, 2]] += x[[0, 2]] @ a[0][0, 0].T @ b[0][0, 0].T
    torch.testing.assert_close(y, expected, **TOL)


def test_inference_tensors_are_never_skipped() -> None:
    with torch.inference_mode():
        weights = torch.zeros(2, 1, 4, 8)
    assert cpu_lora_fix.slot_is_zero(weights, 0) is False
