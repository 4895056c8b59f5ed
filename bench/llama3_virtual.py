"""A virtual Llama-3-8B for the orthogonality benchmark: its shapes, a sparse model directory
with real safetensors headers, a filled subspace cache, an adapter on every linear module,
and weights with a Llama-like spectrum."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from app.lora import LoraAdapter, LoraModule, write_lora_adapter
from app.orthogonality.subspaces import Subspace, SubspaceStore

LAYERS, R, K = 32, 16, 16
SHAPES = {  # kind: (d_out, d_in)
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}


def weight_name(layer: int, kind: str) -> str:
    block = "mlp" if kind in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{block}.{kind}.weight"


def write_virtual_model(path: Path) -> Path:
    """config.json + a sparse bf16 safetensors file: real header, unwritten (zero) data."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": LAYERS,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
                "torch_dtype": "bfloat16",
            }
        )
    )
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for layer in range(LAYERS):
        for kind, (d_out, d_in) in SHAPES.items():
            size = d_out * d_in * 2
            header[weight_name(layer, kind)] = {
                "dtype": "BF16",
                "shape": [d_out, d_in],
                "data_offsets": [offset, offset + size],
            }
            offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with (path / "model.safetensors").open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + offset)
    return path


def fill_cache(store: SubspaceStore, gen: torch.Generator) -> None:
    """Random orthonormal V₀ (d_in × K) and U₀ (d_out × K) per weight: precomputed subspaces."""
    for layer in range(LAYERS):
        for kind, (d_out, d_in) in SHAPES.items():
            U = torch.linalg.qr(torch.randn(d_out, K, generator=gen))[0]  # [d_out, K]
            V = torch.linalg.qr(torch.randn(d_in, K, generator=gen))[0]  # [d_in, K]
            S = torch.sort(torch.rand(K, generator=gen) + 1, descending=True).values  # [K]
            store.put(
                Subspace(weight_name(layer, kind), U, S, V, "synthetic", 0.0),
                {"method": "synthetic", "residual": "0.0"},
            )


def write_adapter(path: Path, gen: torch.Generator) -> Path:
    """An r = R adapter (bf16 factors, scaling 2) on every linear module, via app.lora."""
    modules = {
        weight_name(layer, kind): LoraModule(
            (torch.randn(R, d_in, generator=gen) / 64).bfloat16(),  # A: (R, d_in)
            (torch.randn(d_out, R, generator=gen) / 64).bfloat16(),  # B: (d_out, R)
            2.0,
        )
        for layer in range(LAYERS)
        for kind, (d_out, d_in) in SHAPES.items()
    }
    return write_lora_adapter(LoraAdapter(modules), path)


def synthetic_weight(
    d_out: int, d_in: int, gen: torch.Generator, spikes: int = 64, sigma: float = 0.02
) -> torch.Tensor:
    X = torch.linalg.qr(torch.randn(d_out, spikes, generator=gen))[0]  # [d_out, spikes]
    Y = torch.linalg.qr(torch.randn(d_in, spikes, generator=gen))[0]  # [d_in, spikes]
    edge = sigma * (math.sqrt(d_out) + math.sqrt(d_in))  # bulk edge of the noise
    s = edge * (1 + 3 * torch.arange(1, spikes + 1, dtype=torch.float32) ** -0.6)  # [spikes]
    return (X * s) @ Y.T + sigma * torch.randn(d_out, d_in, generator=gen)  # [d_out, d_in]
