"""Validation of a LoRA patch at the door, before anything is registered.

Checks run cheapest first: file listing, sizes, config JSON, the safetensors header (names, shapes,
dtypes), the base model's weight shapes (also from headers), and only then the tensors themselves
(finiteness) and the sha256 of the weights. Each failure raises AdapterValidationError (an
InvalidRequest: a 400) with a stable `code`:

    invalid_name            name does not match NAME_PATTERN, or uses the reserved 'stack-' prefix
    missing_file            adapter dir, adapter_config.json or adapter_model.safetensors missing
    pickle_weights_refused  a pickled file (.bin, .pt, .pth, .pkl, .pickle, .ckpt) is present
    too_large               config + weights exceed max_bytes
    invalid_config          adapter_config.json is not a JSON object with a positive int r
    not_lora                peft_type is not LORA
    unsupported_feature     DoRA, modules_to_save, bias, … (ΔW is not s·B·A; see app.lora)
    invalid_weights         the safetensors file cannot be parsed
    unexpected_tensor_keys  key not base_model.model.<module>.lora_{A,B}.weight, or lacks its pair
    no_lora_weights         the weights file holds no LoRA factors
    invalid_dtype           a tensor is not a float type
    shape_mismatch          A is not (r × d_in) / B not (d_out × r), or r differs from the config
    rank_too_large          the largest rank (or config r) exceeds max_rank
    base_model_mismatch     a targeted module is not in the base, or its W is not (d_out × d_in)
    non_finite_weights      a NaN or ±inf in any factor
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from app.constants import (
    CONFIG_FILE,
    MODEL_CONFIG_FILE,
    NAME_PATTERN,
    PICKLE_SUFFIXES,
    STACK_PREFIX,
    WEIGHTS_FILE,
)
from app.exceptions import InvalidRequest
from app.lora import LoraFormatError, leaf_names, read_checked
from app.model.identity import model_identity, weight_shapes
from app.patches.metadata import weights_sha256


class AdapterValidationError(InvalidRequest, ValueError):
    """A patch refused at the door: `message` for people, `code` for machines, `param` names the
    offending field, file, module or tensor key when there is one."""

    def __init__(self, message: str, param: str | None, code: str) -> None:
        super().__init__(message, param=param, code=code)

    def __repr__(self) -> str:
        return f"AdapterValidationError(code={self.code!r}, param={self.param!r}, {self.message!r})"


@dataclass(frozen=True)
class ValidatedAdapter:
    """What a valid patch is. `rank` is the largest module rank; `per_module_scaling` is True when
    rank_pattern/alpha_pattern give modules different scalings, which engines reading only the
    global α/r (vLLM) ignore: serve `combine_adapters([dir], out)` (scalings folded) instead."""

    rank: int
    target_modules: list[str]  # leaf names, e.g. ['q_proj', 'v_proj']
    modules: list[str]  # base weight names, e.g. 'model.layers.0.self_attn.q_proj.weight'
    weights_sha256: str
    size_bytes: int  # adapter_config.json + adapter_model.safetensors
    base_model: dict[str, str]  # app.model.identity.model_identity(model_dir)
    per_module_scaling: bool = False
    warnings: list[str] = field(default_factory=list)


def validate_name(name: str) -> str:
    """Return `name` if it fully matches NAME_PATTERN (lowercase [a-z0-9._-], ≤ 63 chars, starting
    alphanumeric: no '/', no leading '.') and does not use the reserved 'stack-' prefix."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise AdapterValidationError(
            f"invalid name {name!r}: use 1-63 characters from a-z 0-9 . _ - starting with a letter "
            "or digit",
            "name",
            "invalid_name",
        )
    if name.startswith(STACK_PREFIX):
        raise AdapterValidationError(
            f"invalid name {name!r}: {STACK_PREFIX!r} is reserved for stacked patches",
            "name",
            "invalid_name",
        )
    return name


def validate_adapter(
    adapter_dir: Path, model_dir: Path, *, max_rank: int, max_bytes: int
) -> ValidatedAdapter:
    """Check that `adapter_dir` is a plain safetensors LoRA for the base in `model_dir` (checks and
    codes in the module docstring); raise AdapterValidationError on the first failure."""
    adapter_dir, model_dir = Path(adapter_dir), Path(model_dir)
    if not adapter_dir.is_dir():
        raise AdapterValidationError(
            f"adapter directory {adapter_dir.name!r} does not exist", None, "missing_file"
        )
    _refuse_pickles(adapter_dir)
    size = 0
    for file_name in (CONFIG_FILE, WEIGHTS_FILE):
        path = adapter_dir / file_name
        if not path.is_file():
            raise AdapterValidationError(f"{file_name} is missing", file_name, "missing_file")
        size += path.stat().st_size
    if size > max_bytes:
        raise AdapterValidationError(
            f"adapter is {size} bytes, the limit is {max_bytes}", None, "too_large"
        )
    try:
        config, header = read_checked(adapter_dir)
    except LoraFormatError as exc:
        raise AdapterValidationError(exc.message, exc.param, exc.code) from exc

    rank = max(a[0] for a, _ in header.shapes.values())
    if max(rank, config["r"]) > max_rank:
        raise AdapterValidationError(
            f"rank {max(rank, config['r'])} exceeds the engine's max LoRA rank {max_rank}",
            "r",
            "rank_too_large",
        )
    warnings = _check_base(header.shapes, config, model_dir)
    _check_finite(adapter_dir, header.keys)
    return ValidatedAdapter(
        rank=rank,
        target_modules=leaf_names(header.shapes),
        modules=sorted(header.shapes),
        weights_sha256=weights_sha256(adapter_dir),
        size_bytes=size,
        base_model=model_identity(model_dir),
        per_module_scaling=bool(config.get("rank_pattern") or config.get("alpha_pattern")),
        warnings=warnings,
    )


def _refuse_pickles(adapter_dir: Path) -> None:
    for root, _dirs, files in os.walk(adapter_dir):  # does not follow symlinked dirs
        for file in sorted(files):
            if Path(file).suffix.lower() not in PICKLE_SUFFIXES:
                continue
            rel = (Path(root) / file).relative_to(adapter_dir).as_posix()
            raise AdapterValidationError(
                f"{rel}: pickled weights are refused (they can run code when loaded); "
                f"upload {WEIGHTS_FILE} only",
                rel,
                "pickle_weights_refused",
            )


def _check_base(
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    config: dict,
    model_dir: Path,
) -> list[str]:
    """Every module must be a 2-D base weight W (d_out × d_in) with A (r × d_in), B (d_out × r).
    Returns informative warnings (architecture / base name differences)."""
    base = weight_shapes(model_dir.resolve())
    for name, (a_shape, b_shape) in sorted(shapes.items()):
        w_shape = base.get(name)
        if w_shape is None:
            raise AdapterValidationError(
                f"{name}: the base model has no such weight; the adapter was made for another "
                "model",
                name,
                "base_model_mismatch",
            )
        if len(w_shape) != 2 or a_shape[1] != w_shape[1] or b_shape[0] != w_shape[0]:
            raise AdapterValidationError(
                f"{name}: base weight is {list(w_shape)} but the adapter's ΔW = B·A is "
                f"{[b_shape[0], a_shape[1]]}; the adapter was made for another model",
                name,
                "base_model_mismatch",
            )
    warnings: list[str] = []
    base_arch = (
        json.loads((model_dir / MODEL_CONFIG_FILE).read_text()).get("architectures") or ["unknown"]
    )[0]
    trained_on = (config.get("auto_mapping") or {}).get("base_model_class")
    if trained_on and trained_on != base_arch:
        warnings.append(f"adapter was trained on a {trained_on}, the base is a {base_arch}")
    return warnings


def _check_finite(adapter_dir: Path, keys: dict[str, tuple[str, str]]) -> None:
    """Load one factor at a time and require every element finite."""
    with safe_open(str(adapter_dir / WEIGHTS_FILE), framework="pt") as fh:
        for a_key, b_key in keys.values():
            for key in (a_key, b_key):
                if not bool(torch.isfinite(fh.get_tensor(key)).all()):
                    raise AdapterValidationError(
                        f"{key} holds NaN or infinite values", key, "non_finite_weights"
                    )
