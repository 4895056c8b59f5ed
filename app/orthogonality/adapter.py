"""Read a PEFT LoRA adapter directory into per-module factors (B, A, scaling)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from app.orthogonality import linalg

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors",)
# "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" (an adapter name may sit
# before ".weight" in some exports: "...lora_A.default.weight").
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
_EMBED_KEY = re.compile(r"\.lora_embedding_[AB]")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class LoraFactors:
    """ΔW = scaling·B·A for one module."""

    module: str  # base module path, e.g. "model.layers.0.self_attn.q_proj"
    B: torch.Tensor  # [d_out, r]
    A: torch.Tensor  # [r, d_in]
    scaling: float
    rank: int

    @property
    def layer(self) -> int | None:
        m = _LAYER.search("." + self.module + ".")
        return int(m.group(1)) if m else None

    @property
    def kind(self) -> str:
        return self.module.rsplit(".", 1)[-1]

    def svd(self) -> linalg.LowRankSVD:
        return linalg.lora_delta_svd(self.B, self.A, self.scaling)


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraFactors]
    skipped: list[dict[str, str]]

    @property
    def name(self) -> str:
        return self.path.name


def _natural(name: str) -> list[tuple[int, int | str]]:
    """Sort key: "layers.2" before "layers.10"."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's `get_pattern_key`: a pattern key applies when `(.*\\.)?(key)$` matches."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scaling(config: dict[str, Any], module: str) -> tuple[int, float]:
    """(r, s) for one module: r and α from `rank_pattern` / `alpha_pattern` else `r` /
    `lora_alpha`; s = α/r, or α/√r with `use_rslora` (Kalajdzievski 2023, rsLoRA)."""
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))
    alpha = float(
        _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r))
    )
    return r, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def load_adapter(adapter_dir: Path) -> LoraAdapter:
    """Parse `adapter_config.json` + `adapter_model.safetensors`. Raises FileNotFoundError for
    a missing file and ValueError for a non-LoRA or inconsistent adapter."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found")
    weights_path = next(
        (adapter_dir / f for f in WEIGHTS_FILES if (adapter_dir / f).is_file()), None
    )
    if weights_path is None:
        raise FileNotFoundError(f"{adapter_dir / WEIGHTS_FILES[0]} not found")
    config = json.loads(config_path.read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{adapter_dir.name}: peft_type {config.get('peft_type')} is not LORA")
    tensors = load_file(str(weights_path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    skipped: list[dict[str, str]] = []
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            if _EMBED_KEY.search(key):
                skipped.append({"module": key, "reason": "embedding LoRA is not scored"})
            continue
        pairs.setdefault(m.group("module"), {})[m.group("ab")] = tensor
    modules: dict[str, LoraFactors] = {}
    for module, ab in sorted(pairs.items(), key=lambda kv: _natural(kv[0])):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{adapter_dir.name}: {module} lacks lora_{'AB'[('A' in ab)]}")
        A, B = ab["A"], ab["B"]  # [r, d_in], [d_out, r]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"{adapter_dir.name}: {module} has lora_A {tuple(A.shape)} and "
                f"lora_B {tuple(B.shape)}, which do not chain"
            )
        r, scaling = module_scaling(config, module)
        if r != A.shape[0]:
            raise ValueError(
                f"{adapter_dir.name}: {module} has rank {A.shape[0]} but the config "
                f"(r / rank_pattern) says {r}"
            )
        modules[module] = LoraFactors(module, B, A, scaling, r)
    if not modules:
        raise ValueError(f"{adapter_dir.name}: no LoRA linear modules in {weights_path.name}")
    if config.get("use_dora"):
        skipped.append(
            {
                "module": "*",
                "reason": "DoRA magnitude vectors are ignored; scores "
                "describe the direction update s·B·A only",
            }
        )
    return LoraAdapter(adapter_dir, config, modules, skipped)
