"""Training a patch on the tiny model: loss goes down, outputs change, the adapter is valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.factory.preserve import chat_prompt_ids
from app.patches.metadata import PatchMetadata, weights_sha256
from app.patches.validation import validate_adapter
from tests.factory.conftest import HARMFUL

pytestmark = pytest.mark.slow


@torch.no_grad()
def _greedy(model, tokenizer, prompt: str, n: int = 12) -> list[int]:
    ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def test_training_lowers_loss_and_changes_output(trained_patch, tiny_model: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, result = trained_patch
    assert result.steps == 12 and len(result.losses) == 12
    assert result.final_loss < result.initial_loss * 0.8
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    before = _greedy(base, tokenizer, HARMFUL[0])
    patched = PeftModel.from_pretrained(base, str(result.out_dir)).eval()
    assert _greedy(patched, tokenizer, HARMFUL[0]) != before


def test_written_adapter_has_valid_metadata_and_registers(trained_patch, tiny_model: Path) -> None:
    config, result = trained_patch
    out = result.out_dir
    assert {p.name for p in out.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "safepatch.json",
        "README.md",
    }
    meta = PatchMetadata.read(out)
    assert meta is not None and meta.name == "tiny-refusal" and meta.rank == 4
    assert meta.weights_sha256 == weights_sha256(out)
    assert meta.base_model["name"] == tiny_model.name
    training = meta.training or {}
    assert training["mode"] == "preserving" and training["steps"] == 12
    assert training["margin_weight"] == 1.0
    assert training["lr"] == 1e-2 and training["n_harmful"] == len(HARMFUL)
    assert training["n_preserve"] > 0 and training["command"] == "pytest"
    assert all(len(h) == 64 for h in training["data_sha256"].values())
    assert training["final_refusal_loss"] < training["initial_refusal_loss"]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == tiny_model.name  # no local path
    settings = Settings()
    validated = validate_adapter(
        out, tiny_model, max_rank=settings.max_lora_rank, max_bytes=settings.max_adapter_bytes
    )
    assert validated.rank == 4 and validated.weights_sha256 == meta.weights_sha256


def test_safety_only_mode_and_layer_selection(
    tiny_model: Path, prompt_files, tmp_path: Path
) -> None:
    from safetensors import safe_open

    from app.factory.data import parse_source
    from app.factory.train import TrainConfig, train_patch

    config = TrainConfig(
        model_dir=tiny_model,
        out_dir=tmp_path / "so",
        name="so",
        mode="safety-only",
        harmful=[parse_source(f"{prompt_files['harmful']}?split=all", column="request")],
        rank=2,
        alpha=4,
        lr=1e-2,
        steps=3,
        batch_size=4,
        layers=[1],
        target_modules=["q_proj", "v_proj"],
        threads=1,
    )
    result = train_patch(config)
    with safe_open(str(result.out_dir / "adapter_model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert keys and all(".layers.1." in k for k in keys)
    assert (PatchMetadata.read(result.out_dir).training or {})["preserve_sources"] == []
    with pytest.raises(ValueError, match="preserve prompts"):
        train_patch(
            TrainConfig(
                model_dir=tiny_model,
                out_dir=tmp_path / "x",
                name="x",
                harmful=config.harmful,
                mode="preserving",
                steps=1,
            )
        )


def test_training_calibrates_the_gate_on_the_dev_split(trained_patch, tiny_model: Path) -> None:
    """The fixture trains on whole files (no dev split: no gate); the same patch calibrated on
    the dev split of a train-split source gets a gated block of its own."""
    from dataclasses import replace

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.factory.calibrate import calibrate_trained
    from app.factory.data import with_split

    config, result = trained_patch
    assert PatchMetadata.read(result.out_dir).gate is None  # nothing held out
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(result.out_dir)).eval()
    held = replace(
        config,
        harmful=[with_split(s, "train") for s in config.harmful],
        preserve=[with_split(s, "train") for s in config.preserve],
    )
    block = calibrate_trained(held, model, tokenizer)
    assert block is not None and block["mode"] == "gated" and 1 <= block["probe_tokens"] <= 16
    record = block["calibration"]
    assert record["by"] == "safepatch train" and record["probe_tokens"] == block["probe_tokens"]
    assert 0 < record["harmful_sets"]["harmful-dev"] < len(HARMFUL)
    assert len(record["curve"]) == 16
