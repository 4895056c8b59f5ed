"""Fixtures for the patch factory: small prompt files and a patch trained on the tiny model
(`tiny_model` comes from tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.tiny_training import tiny_config

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
    from app.factory.train import train_patch

    config = tiny_config(
        tiny_model,
        prompt_files,
        tmp_path_factory.mktemp("adapters") / "tiny-refusal",
        tmp_path_factory.mktemp("cache"),
        mode="preserving",
        steps=12,
        batch_size=8,
        preserve_tokens=8,
        kl_top_k=16,
        margin_weight=1.0,
        seed=0,
        description="test patch",
        categories=["test"],
        command="pytest",
    )
    return config, train_patch(config)
