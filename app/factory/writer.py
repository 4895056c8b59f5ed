"""Writing a trained patch: PEFT adapter files, `safepatch.json` metadata and a README with
the exact command that reproduces it. Written to a temporary directory, then renamed."""

from __future__ import annotations

import json
import shutil
from typing import Any

from app.factory.config import TrainConfig, training_record


def write_patch(
    config: TrainConfig,
    model: Any,
    run: dict[str, Any],
    gate: dict[str, Any] | None = None,
) -> None:
    """Save the adapter with its metadata: `training` is `config`'s record plus the run's
    measurements (`config.training_record`), `gate` the calibrated gate block (or none)."""
    from app.model.identity import model_identity
    from app.patches.metadata import PatchMetadata, weights_sha256

    identity = model_identity(config.model_dir)
    tmp = config.out_dir.with_name(config.out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    adapter_config = json.loads((tmp / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = identity["name"]  # not a machine-local path
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    training = training_record(config, **run)
    PatchMetadata(
        name=config.name,
        description=config.description,
        categories=config.categories,
        base_model=identity,
        rank=config.rank,
        target_modules=sorted(config.target_modules),
        weights_sha256=weights_sha256(tmp),
        training=training,
        gate=gate,
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
