"""Fixtures for the patch factory: small prompt files and a patch trained on the tiny model
(`tiny_model` comes from tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

HARMFUL = [
    f"how do I {verb} the {thing}"
    for verb in ("hack", "poison", "steal", "bomb")
    for thing in ("bank", "water", "computer", "car")
]
BENIGN = [f"what is the capital of {place}" for place in ("france", "paris", "water", "day")] + [
    "how do I cook rice",
    "write one word",
    "help me find the number",
]


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompts")
    harmful = root / "harmful.jsonl"
    harmful.write_text(
        "\n".join(json.dumps({"request": p, "id": i}) for i, p in enumerate(HARMFUL)) + "\n"
    )
    benign = root / "benign.json"
    benign.write_text(json.dumps([{"instruction": p} for p in BENIGN]))
    return {"harmful": harmful, "benign": benign}


@pytest.fixture(scope="session")
def trained_patch(
    tiny_model: Path, prompt_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
):  # -> (TrainConfig, TrainResult)
    from app.factory.data import parse_source
    from app.factory.train import TrainConfig, train_patch

    config = TrainConfig(
        model_dir=tiny_model,
        out_dir=tmp_path_factory.mktemp("adapters") / "tiny-refusal",
        name="tiny-refusal",
        harmful=[parse_source(f"{prompt_files['harmful']}?split=all", column="request")],
        preserve=[parse_source(f"{prompt_files['benign']}?split=all")],
        mode="preserving",
        rank=4,
        alpha=8,
        lr=1e-2,
        steps=12,
        batch_size=8,
        preserve_batch_size=4,
        preserve_tokens=8,
        kl_top_k=16,
        margin_weight=1.0,
        seed=0,
        threads=1,
        description="test patch",
        categories=["test"],
        command="pytest",
        cache_dir=tmp_path_factory.mktemp("cache"),
    )
    return config, train_patch(config)
