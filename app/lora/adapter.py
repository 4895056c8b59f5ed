"""The one LoRA-format module: read, validate, scale and write PEFT LoRA adapters (safetensors
only) as per-module (A, B, s) triples. Serving, validation, stacking, training and scoring all
go through it, like peft's single `get_delta_weight`.

For a targeted linear module with base weight W of shape (d_out × d_in), PEFT's LoRA computes

    y = x Wᵀ + s · (x Aᵀ) Bᵀ        i.e.  ΔW = s · B @ A

with A: (r × d_in), B: (d_out × r) and s = α / r, or s = α / √r with rsLoRA (`use_rslora`). For each
module, r and α come from the first `rank_pattern` / `alpha_pattern` key that matches the module
path (PEFT's rule: regex ``(.*\\.)?(key)$``), else from the config's `r` / `lora_alpha`
(app.lora.config). Factors keep their stored dtype; ΔW and everything derived from it (stacks,
SVDs) is computed in fp32 or wider first.

Modules are keyed by their base weight name (``model.layers.0.self_attn.q_proj.weight``); PEFT
stores their factors as ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.constants import CONFIG_FILE, WEIGHTS_FILE
from app.lora import config as peft_config
from app.lora.config import LoraFormatError, module_path

PEFT_PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_ADAPTER_NAMED = re.compile(r"(\.lora_[AB])\.[^.]+\.weight$")  # '….lora_A.default.weight'
_EMBEDDING = re.compile(r"\.lora_embedding_[AB]")


@dataclass(frozen=True)
class LoraModule:
    """One module's update ΔW = scaling · b @ a."""

    a: torch.Tensor  # (r, d_in)
    b: torch.Tensor  # (d_out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        """ΔW = s · B @ A in fp32, shape (d_out, d_in)."""
        return self.scaling * (self.b.float() @ self.a.float())  # (d_out, d_in)


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter: base weight name -> module, plus the raw `adapter_config.json`."""

    modules: dict[str, LoraModule]
    config: dict[str, Any] = field(default_factory=dict)
    # lenient reads only: what was left out, as {"module", "reason"} rows
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        """The largest module rank (what an engine's max LoRA rank must accommodate)."""
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def target_modules(self) -> list[str]:
        """Sorted leaf names of the targeted modules, e.g. ['q_proj', 'v_proj']."""
        return leaf_names(self.modules)


def leaf_names(weight_names: Iterable[str]) -> list[str]:
    """'model.layers.0.self_attn.q_proj.weight' -> 'q_proj', deduplicated and sorted."""
    return sorted({module_path(name).rsplit(".", 1)[-1] for name in weight_names})


def split_keys(
    keys: Iterable[str], *, lenient: bool = False
) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Group PEFT tensor keys by module: ({weight name: (A key, B key)}, unexpected keys).

    A key is unexpected unless it is ``base_model.model.<path>.lora_{A,B}.weight`` and its partner
    factor is present too. `lenient` also takes keys that name the adapter
    (``….lora_A.default.weight``, as some exports write them) and keys without the prefix."""
    halves: dict[str, dict[str, str]] = {}
    unexpected: list[str] = []
    for key in keys:
        body = key.removeprefix(PEFT_PREFIX)
        prefixed = body != key
        if lenient:
            body, prefixed = _ADAPTER_NAMED.sub(r"\1.weight", body), True
        suffix = next((s for s in (A_SUFFIX, B_SUFFIX) if body.endswith(s)), None)
        if suffix is None or not prefixed or body == suffix:
            unexpected.append(key)
            continue
        halves.setdefault(body.removesuffix(suffix) + ".weight", {})[suffix] = key
    pairs: dict[str, tuple[str, str]] = {}
    for name, found in sorted(halves.items()):
        if len(found) == 2:
            pairs[name] = (found[A_SUFFIX], found[B_SUFFIX])
        else:
            unexpected.extend(found.values())
    return pairs, sorted(unexpected)


@dataclass(frozen=True)
class HeaderInfo:
    """What the safetensors header says: per module the A/B shapes and dtypes, plus stray keys."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # weight name -> (A shape, B shape)
    keys: dict[str, tuple[str, str]]  # weight name -> (A key, B key)
    dtypes: dict[str, str]  # tensor key -> safetensors dtype ('F32', ...)
    unexpected: list[str]


def read_header(adapter_dir: Path, *, lenient: bool = False) -> HeaderInfo:
    """Read tensor names, shapes and dtypes from the safetensors header only (no tensor data).
    `lenient` (see `split_keys`) keeps only the LoRA factors' dtypes."""
    path = adapter_dir / WEIGHTS_FILE
    if not path.is_file():
        raise LoraFormatError(f"{WEIGHTS_FILE} is missing", "missing_file", WEIGHTS_FILE)
    try:
        with safe_open(str(path), framework="pt") as fh:
            slices = {key: fh.get_slice(key) for key in fh.keys()}  # noqa: SIM118 - not a mapping
            meta = {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in slices.items()}
    except OSError:  # the disk failed, not the file's format: the caller reports a storage fault
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise LoraFormatError(
            f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}",
            "invalid_weights",
            WEIGHTS_FILE,
        ) from exc
    keys, unexpected = split_keys(meta, lenient=lenient)
    shapes = {name: (meta[a][0], meta[b][0]) for name, (a, b) in keys.items()}
    if lenient:
        meta = {k: meta[k] for pair in keys.values() for k in pair}
    return HeaderInfo(shapes, keys, {k: v[1] for k, v in meta.items()}, unexpected)


def check_structure(config: Mapping[str, Any], header: HeaderInfo) -> None:
    """Raise LoraFormatError unless every key is a LoRA factor, factors are 2-D floats with
    A: (r × d_in), B: (d_out × r) and r equal to the config's rank for that module."""
    if header.unexpected:
        shown = ", ".join(header.unexpected[:5])
        raise LoraFormatError(
            f"unexpected tensor keys: {shown}", "unexpected_tensor_keys", header.unexpected[0]
        )
    if not header.keys:
        raise LoraFormatError("the adapter holds no LoRA weights", "no_lora_weights")
    for key, dtype in header.dtypes.items():
        if dtype not in FLOAT_DTYPES:
            raise LoraFormatError(
                f"{key} has dtype {dtype}; expected a float type", "invalid_dtype", key
            )
    for name, (a_shape, b_shape) in header.shapes.items():
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] == 0:
            raise LoraFormatError(
                f"{name}: lora_A {list(a_shape)} and lora_B {list(b_shape)} are not (r×d_in), "
                "(d_out×r)",
                "shape_mismatch",
                name,
            )
        expected_r, _ = peft_config.config_rank_alpha(config, name)
        if a_shape[0] != expected_r:
            raise LoraFormatError(
                f"{name}: rank {a_shape[0]} but the config says r={expected_r}",
                "shape_mismatch",
                name,
            )


def read_checked(adapter_dir: Path) -> tuple[dict[str, Any], HeaderInfo]:
    """Config and safetensors header of a plain LoRA, checked against each other (no tensors
    loaded). Raises LoraFormatError."""
    config, header, _ = _read_checked(adapter_dir, lenient=False)
    return config, header


def _read_checked(
    adapter_dir: Path, *, lenient: bool
) -> tuple[dict[str, Any], HeaderInfo, list[dict[str, str]]]:
    """`read_checked`; `lenient` reads what it can instead (features beyond ΔW = s·B·A and
    keys that are not linear LoRA factors are left out and listed as skipped)."""
    config = peft_config.read_config(adapter_dir)
    problems = peft_config.unsupported_features(config)
    skipped: list[dict[str, str]] = []
    if problems and not lenient:
        raise LoraFormatError(
            "unsupported LoRA features: " + "; ".join(problems), "unsupported_feature"
        )
    skipped += [
        {"module": "*", "reason": f"{p} is ignored: only the update s·B·A is read"}
        for p in problems
    ]
    header = read_header(adapter_dir, lenient=lenient)
    if lenient:
        skipped += [
            {"module": key, "reason": "embedding LoRA is not read"}
            for key in header.unexpected
            if _EMBEDDING.search(key)
        ]
        header = HeaderInfo(header.shapes, header.keys, header.dtypes, [])
    check_structure(config, header)
    return config, header, skipped


def read_lora_adapter(adapter_dir: Path, *, lenient: bool = False) -> LoraAdapter:
    """Load an adapter as {base weight name: LoraModule(A, B, s)}; tensors keep their dtype.

    Raises LoraFormatError for a non-LoRA config, features listed by `unsupported_features`,
    stray keys or inconsistent shapes. `lenient` (for analysis, e.g. orthogonality scores of
    any PEFT export) leaves out unsupported features and stray keys and lists them in
    `skipped`; a missing file, a bad config or inconsistent shapes still raise."""
    adapter_dir = Path(adapter_dir)
    config, header, skipped = _read_checked(adapter_dir, lenient=lenient)
    modules: dict[str, LoraModule] = {}
    with safe_open(str(adapter_dir / WEIGHTS_FILE), framework="pt") as fh:
        for name, (a_key, b_key) in header.keys.items():
            a = fh.get_tensor(a_key)  # (r, d_in)
            b = fh.get_tensor(b_key)  # (d_out, r)
            modules[name] = LoraModule(a, b, peft_config.module_scaling(config, name))
    return LoraAdapter(modules, config, skipped)


def adapter_rank(adapter_dir: Path) -> int:
    """Largest module rank of an adapter, from its safetensors header only."""
    return max((a[0] for a, _ in read_header(adapter_dir).shapes.values()), default=0)


def write_lora_adapter(
    adapter: LoraAdapter,
    out_dir: Path,
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `adapter` as a PEFT LoRA dir with every module's scaling folded into B.

    Writes B' = s·B (computed in fp32, stored in B's dtype) and α = r per module, so PEFT and vLLM
    both use scaling 1 and ΔW = B'·A = s·B·A. The config `r` is the largest module rank; modules of
    another rank get `rank_pattern` / `alpha_pattern` entries (escaped exact paths). target_modules
    lists the exact module paths, so PEFT wraps exactly the modules that have weights (vLLM reads
    only their last component). `out_dir` is created; callers wanting atomicity write to a fresh
    temp dir and rename it (as stacking.combine_adapters does)."""
    if not adapter.modules:
        raise ValueError("an adapter needs at least one module")
    r = adapter.rank
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    for name, mod in sorted(adapter.modules.items()):
        path = module_path(name)
        tensors[PEFT_PREFIX + path + A_SUFFIX] = mod.a.contiguous()  # (r_m, d_in)
        b = (mod.b.float() * mod.scaling).to(mod.b.dtype)  # (d_out, r_m)
        tensors[PEFT_PREFIX + path + B_SUFFIX] = b.contiguous()
        if mod.rank != r:
            rank_pattern[re.escape(path)] = mod.rank
    source = adapter.config
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": source.get("task_type"),
        "base_model_name_or_path": source.get("base_model_name_or_path"),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": sorted(module_path(name) for name in adapter.modules),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt", **(metadata or {})})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir
