"""Writing a trained patch: PEFT adapter files, `safepatch.json` metadata and a README with
the exact command that reproduces it. Written to a temporary directory, then renamed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from app.factory.data import file_sha256

if TYPE_CHECKING:
    from app.factory.train import TrainConfig


def write_patch(
    config: TrainConfig,
    model: Any,
    steps: int,
    initial: float,
    final: float,
    seconds: float,
    n_harmful: int,
    n_preserve: int,
) -> None:
    from app.model.identity import model_identity
    from app.patches.metadata import PatchMetadata, weights_sha256

    identity = model_identity(config.model_dir)
    tmp = config.out_dir.with_name(config.out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    adapter_config = json.loads((tmp / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = identity["name"]  # not a machine-local path
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    sources = config.harmful + config.preserve + config.selective_against
    data_files = sorted({str(src.path) for src in sources})
    training = {
        "mode": config.mode,
        "rank": config.rank,
        "alpha": config.alpha,
        "target_modules": config.target_modules,
        "layers": config.layers,
        "lr": config.lr,
        "epochs": config.epochs,
        "steps": steps,
        "batch_size": config.batch_size,
        "preserve_batch_size": config.preserve_batch_size,
        "preserve_weight": config.preserve_weight,
        "margin_weight": config.margin_weight,
        "preserve_tokens": config.preserve_tokens,
        "kl_top_k": config.kl_top_k,
        "selective_dims": config.selective_dims,
        "selective_tail": config.selective_tail,
        "selective_against_sources": [s.spec() for s in config.selective_against],
        "seed": config.seed,
        "refusal_category": config.refusal_category,
        "refusal_tokens": config.refusal_tokens,
        "harmful_sources": [s.spec() for s in config.harmful],
        "preserve_sources": [s.spec() for s in config.preserve]
        if config.mode == "preserving"
        else [],
        "n_harmful": n_harmful,
        "n_preserve": n_preserve,
        "data_sha256": {f: file_sha256(Path(f)) for f in data_files},
        "initial_refusal_loss": round(initial, 4),
        "final_refusal_loss": round(final, 4),
        "training_seconds": round(seconds, 1),
        "command": config.command,
        "torch": torch.__version__,
    }
    PatchMetadata(
        name=config.name,
        description=config.description,
        categories=config.categories,
        base_model=identity,
        rank=config.rank,
        target_modules=sorted(config.target_modules),
        weights_sha256=weights_sha256(tmp),
        training=training,
    ).write(tmp)
    (tmp / "README.md").write_text(_readme(config, training))
    for path in tmp.iterdir():  # safetensors writes 0600; the server may run as another user
        path.chmod(0o644)
    shutil.rmtree(config.out_dir, ignore_errors=True)
    config.out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(config.out_dir)


def _readme(config: TrainConfig, training: dict[str, Any]) -> str:
    return (
        f"# {config.name}\n\n{config.description or 'SafePatch LoRA safety patch.'}\n\n"
        f"Base model: {training.get('base', config.model_dir.name)}; mode `{config.mode}`; "
        f"rank {config.rank}, alpha {config.alpha}; {training['steps']} steps; "
        f"{training['n_harmful']} refusal prompts, {training['n_preserve']} preserve prompts "
        "(train split, see app/factory/data/LICENSES.md).\n\n"
        "Reproduce (from the repository root):\n\n"
        f"```sh\n{config.command or '(trained through the Python API)'}\n```\n\n"
        "Hyper-parameters, data hashes and timing are in `safepatch.json` (`training`); the "
        "latest `safepatch eval` report is in its `evaluation` field. Results: "
        "docs/patch-results.md.\n"
    )
