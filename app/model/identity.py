"""What identifies a base model: its architecture and the shapes of its weights."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from safetensors import safe_open


@lru_cache(maxsize=8)
def weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the model's safetensors files (read from headers)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[name] = tuple(fh.get_slice(name).get_shape())
    return shapes


def model_identity(model_dir: Path) -> dict[str, str]:
    """{'name', 'architecture', 'fingerprint'}; the fingerprint hashes architecture + shapes,
    so two checkpoints of one architecture and size share it (a patch fits both)."""
    config = json.loads((model_dir / "config.json").read_text())
    architecture = (config.get("architectures") or ["unknown"])[0]
    shapes = weight_shapes(model_dir.resolve())
    blob = json.dumps([architecture, sorted(shapes.items())]).encode()
    return {
        "name": model_dir.name,
        "architecture": architecture,
        "fingerprint": hashlib.sha256(blob).hexdigest()[:16],
    }
