"""What identifies a base model: its architecture and the shapes of its weights (`model_identity`),
and, to tell two checkpoints of one architecture apart, a cheap digest of their contents."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from safetensors import safe_open

from app.constants import MODEL_CONFIG_FILE

_SAMPLE_BYTES = 1 << 16  # bytes sampled five times per file by `weights_digest`


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
    config = json.loads((model_dir / MODEL_CONFIG_FILE).read_text())
    architecture = (config.get("architectures") or ["unknown"])[0]
    shapes = weight_shapes(model_dir.resolve())
    blob = json.dumps([architecture, sorted(shapes.items())]).encode()
    return {
        "name": model_dir.name,
        "architecture": architecture,
        "fingerprint": hashlib.sha256(blob).hexdigest()[:16],
    }


def _file_signature(model_dir: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(model_dir.glob("*.safetensors"))
    )


@lru_cache(maxsize=16)
def _content_digest(model_dir: Path, signature: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, size, _ in signature:
        with (model_dir / name).open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            digest.update(name.encode() + size.to_bytes(8, "little") + fh.read(header_len))
            data_start = 8 + header_len
            for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
                fh.seek(data_start + int(frac * max(0, size - data_start - _SAMPLE_BYTES)))
                digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def weights_digest(model_dir: Path) -> str:
    """Cheap content hash of a model's safetensors files: headers plus five 64 KiB samples of
    each file's data (reads well under 1 MiB per file; cached per path, size and mtime)."""
    model_dir = model_dir.resolve()
    return _content_digest(model_dir, _file_signature(model_dir))
