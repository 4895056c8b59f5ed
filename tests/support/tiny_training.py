"""A small training configuration on the tiny model, for the factory tests."""

from __future__ import annotations

from pathlib import Path


def tiny_config(
    tiny_model: Path, prompt_files: dict[str, Path], out_dir: Path, cache_dir: Path, **overrides
):  # -> TrainConfig
    """A small training run on the tiny model and the fixture prompts; `overrides` change it."""
    from app.factory.data import parse_source
    from app.factory.train import TrainConfig

    values = dict(
        model_dir=tiny_model,
        out_dir=out_dir,
        name=out_dir.name,
        harmful=[parse_source(f"{prompt_files['harmful']}?split=all", column="request")],
        preserve=[parse_source(f"{prompt_files['benign']}?split=all")],
        rank=4,
        alpha=8,
        lr=1e-2,
        preserve_batch_size=4,
        threads=1,
        cache_dir=cache_dir,
    )
    return TrainConfig(**values | overrides)
