"""A LoRA adapter as the scorer reads it: app.lora's reader in its lenient mode, a missing file
as FileNotFoundError, modules in natural layer order ("layers.2" before "layers.10")."""

from __future__ import annotations

import re
from pathlib import Path

from app.constants import CONFIG_FILE, WEIGHTS_FILE
from app.lora import LoraAdapter, LoraFormatError, module_path, read_lora_adapter

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(module: str) -> int | None:
    """'model.layers.3.mlp.down_proj' -> 3; None outside the decoder layers."""
    m = _LAYER.search("." + module + ".")
    return int(m.group(1)) if m else None


def kind_of(module: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'down_proj'."""
    return module.rsplit(".", 1)[-1]


def _natural(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def load_adapter(adapter_dir: Path) -> LoraAdapter:
    """Read an adapter for scoring. Raises FileNotFoundError for a missing file and ValueError
    (LoraFormatError) for a non-LoRA or inconsistent adapter, naming the adapter."""
    adapter_dir = Path(adapter_dir)
    for file_name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (adapter_dir / file_name).is_file():
            raise FileNotFoundError(f"{adapter_dir / file_name} not found")
    try:
        adapter = read_lora_adapter(adapter_dir, lenient=True)
    except LoraFormatError as exc:
        raise LoraFormatError(f"{adapter_dir.name}: {exc.message}", exc.code, exc.param) from exc
    order = sorted(adapter.modules, key=lambda name: _natural(module_path(name)))
    return LoraAdapter({n: adapter.modules[n] for n in order}, adapter.config, adapter.skipped)
