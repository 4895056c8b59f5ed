"""PEFT LoRA `adapter_config.json`: parsing, refused features, per-module rank / alpha / scaling.

The one place that reads a LoRA config: serving, validation, stacking and scoring all use it.
A missing `lora_alpha` is 8 (PEFT's `LoraConfig` default), a missing `r` is refused.

For each module PEFT takes r and α from the first `rank_pattern` / `alpha_pattern` key that matches
the module path (regex ``(.*\\.)?(key)$``), else from `r` / `lora_alpha`; the scaling is
s = α / r, or s = α / √r with rsLoRA (`use_rslora`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.constants import CONFIG_FILE

_QUANTIFIERS = re.compile(r"(?<!\\)[*+?{]")  # an unescaped regex quantifier
# `init_lora_weights` values whose adapters only work on a base that PEFT modified in place.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# Config entries that change the forward pass beyond ΔW = s·B·A (truthy value = refused).
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on nn.Parameter (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
}


class LoraFormatError(ValueError):
    """Not a plain PEFT LoRA in safetensors; `code` is machine-readable, `param` the culprit."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


def module_path(weight_name: str) -> str:
    """Base weight name -> module path: strips the trailing '.weight'."""
    return weight_name.removesuffix(".weight")


def read_config(adapter_dir: Path) -> dict[str, Any]:
    """Parse `adapter_config.json`: a LoRA config with a positive int `r` and a numeric alpha."""
    path = adapter_dir / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraFormatError(f"{CONFIG_FILE} is missing", "missing_file", CONFIG_FILE) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraFormatError(f"{CONFIG_FILE} is not valid JSON: {exc}", "invalid_config") from exc
    if not isinstance(config, dict):
        raise LoraFormatError(f"{CONFIG_FILE} must hold a JSON object", "invalid_config")
    if config.get("peft_type") != "LORA":
        raise LoraFormatError(
            f"peft_type is {config.get('peft_type')!r}, only 'LORA' adapters are accepted",
            "not_lora",
            "peft_type",
        )
    r, alpha = config.get("r"), config.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise LoraFormatError(f"r must be a positive integer, got {r!r}", "invalid_config", "r")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise LoraFormatError(f"lora_alpha must be a number, got {alpha!r}", "invalid_config")
    for key in ("rank_pattern", "alpha_pattern"):
        _check_patterns(key, config.get(key) or {})
    return config


def _check_patterns(field_name: str, patterns: object) -> None:
    """Pattern keys are regexes matched against module paths: refuse quantifiers (no
    catastrophic backtracking at the door), bad regexes and non-positive values."""
    if not isinstance(patterns, dict):
        raise LoraFormatError(f"{field_name} must be an object", "invalid_config", field_name)
    for key, value in patterns.items():
        try:
            re.compile(key)
            ok = len(key) <= 256 and not _QUANTIFIERS.search(key)
        except re.error:
            ok = False
        if not ok:
            raise LoraFormatError(
                f"{field_name} key {key[:80]!r} must be a module path or a regex without "
                "quantifiers (*, +, ?, {})",
                "invalid_config",
                field_name,
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise LoraFormatError(
                f"{field_name}[{key[:80]!r}] must be a positive number",
                "invalid_config",
                field_name,
            )
        if field_name == "rank_pattern" and not isinstance(value, int):
            raise LoraFormatError(
                f"rank_pattern[{key[:80]!r}] must be an integer", "invalid_config", field_name
            )


def unsupported_features(config: Mapping[str, Any]) -> list[str]:
    """Human-readable names of config features that make ΔW ≠ s·B·A (so they cannot be stacked)."""
    found = [label for key, label in _UNSUPPORTED_FLAGS.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        found.append(f"bias={config.get('bias')!r} (only 'none' is supported)")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_MUTATING_INITS):
        found.append(f"init_lora_weights={init!r} (needs a base modified by PEFT)")
    return found


def _pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's get_pattern_key: first match wins
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def config_rank_alpha(config: Mapping[str, Any], weight_name: str) -> tuple[int, float]:
    """(r, α) that PEFT uses for this module, honouring `rank_pattern` / `alpha_pattern`."""
    path = module_path(weight_name)
    r = _pattern_value(config.get("rank_pattern") or {}, path, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
    return int(r), float(alpha)


def module_scaling(config: Mapping[str, Any], weight_name: str) -> float:
    """s = α / r, or α / √r when `use_rslora`, with the module's (r, α) from `config_rank_alpha`."""
    r, alpha = config_rank_alpha(config, weight_name)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
