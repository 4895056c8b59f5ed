"""Fixtures for the patch tests: a few real PEFT adapters per session for the tiny Llama
(`tiny_model` from tests/conftest.py: hidden 64, 2 layers, kv dim 32, mlp 128)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.support.lora_adapters import make_lora_adapter

# name -> make_lora_adapter options (seeds 1, 2, ... in this order)
ADAPTERS: dict[str, dict[str, Any]] = {
    "plain": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=2, alpha=6, target_modules=["v_proj", "o_proj", "down_proj"], use_rslora=True),
    "pattern": dict(
        r=3,
        alpha=5,
        target_modules=["q_proj", "gate_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 1},
        alpha_pattern={"gate_proj": 2},
    ),
    "partial": dict(r=2, alpha=3, target_modules=["k_proj", "up_proj"], layers_to_transform=[1]),
}


@pytest.fixture(scope="session")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four adapters that differ in rank, alpha, rsLoRA, patterns and target sets:

    plain:   r=4, α=8, q_proj+v_proj, all layers                  (s = 2)
    rslora:  r=2, α=6, rsLoRA, v_proj+o_proj+down_proj            (s = 6/√2)
    pattern: r=3, α=5, q_proj+gate_proj, rank 1 on layer-1 q_proj, α=2 on gate_proj
    partial: r=2, α=3, k_proj+up_proj, layer 1 only (layers_to_transform)
    """
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_lora_adapter(tiny_model, root / name, seed=seed, **options)
        for seed, (name, options) in enumerate(ADAPTERS.items(), start=1)
    }


@pytest.fixture
def valid_adapter(adapters: dict[str, Path], tmp_path: Path) -> Path:
    """A private, mutable copy of the 'plain' adapter."""
    return Path(shutil.copytree(adapters["plain"], tmp_path / "candidate"))
