"""Exact stacking of several LoRA patches into one adapter by rank concatenation.

vLLM applies one LoRA per request, so a request asking for patches 1..n is served by one combined
adapter whose update is exactly the sum of theirs. For every module m in the union of targets:

    A_cat = [A_1; A_2; …; A_n]              shape (R × d_in)     (row blocks)
    B_cat = [s_1·B_1, s_2·B_2, …, s_n·B_n]  shape (d_out × R)    (column blocks)
    B_cat @ A_cat = Σ_i s_i · B_i @ A_i = Σ_i ΔW_i

Patch i owns a block of width w_i = its largest module rank (so R = Σ w_i is the same for every
module); a module of lower rank, or one the patch does not target, leaves the rest of its block
zero.
The combined config has r = lora_alpha = R (scaling 1), no rsLoRA and no rank/alpha patterns, which
PEFT and vLLM both read the same way. Factors are computed in fp32 and stored in the promoted dtype
of the inputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from app.constants import STACK_PREFIX
from app.files import fsync_dir, replace_dir
from app.lora import (
    LoraAdapter,
    LoraFormatError,
    LoraModule,
    adapter_rank,
    read_lora_adapter,
    write_lora_adapter,
)
from app.patches.metadata import weights_sha256


class StackingError(ValueError):
    """Adapters that cannot be combined exactly (unsupported features, mismatched shapes)."""


def combined_name(names: Sequence[str], shas: Sequence[str]) -> str:
    """Stable, order-independent name for a combination: 'stack-' + 16 hex of
    sha256(json(sorted [(name, weights sha256)])). Re-registering a patch with new weights changes
    the name. The result matches NAME_PATTERN."""
    if len(names) != len(shas):
        raise ValueError("names and shas must have the same length")
    if len(set(names)) != len(names):
        raise ValueError(f"a patch appears more than once in {list(names)}")
    if not names:
        raise ValueError("a combination needs at least one patch")
    blob = json.dumps(sorted(zip(names, shas, strict=True)), separators=(",", ":")).encode()
    return STACK_PREFIX + hashlib.sha256(blob).hexdigest()[:16]


def combined_rank(adapter_dirs: Sequence[Path]) -> int:
    """R = Σ_i w_i, w_i = largest module rank of adapter i, from safetensors headers only."""
    return sum(adapter_rank(Path(d)) for d in adapter_dirs)


def _load_for_stacking(adapter_dir: Path) -> LoraAdapter:
    try:
        return read_lora_adapter(adapter_dir)  # refuses unsupported_features() too
    except LoraFormatError as exc:
        raise StackingError(f"cannot stack {adapter_dir.name}: {exc.message}") from exc


def stack_adapters(adapters: Sequence[LoraAdapter]) -> LoraAdapter:
    """Combine in memory: per module A_cat (R × d_in), B_cat (d_out × R) with scalings folded into B
    and zero blocks where a patch lacks the module; every combined module has scaling 1."""
    if not adapters:
        raise StackingError("nothing to stack")
    widths = [a.rank for a in adapters]  # w_i
    total = sum(widths)  # R
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    dtype = adapters[0].modules[next(iter(adapters[0].modules))].a.dtype
    for adapter in adapters:
        for mod in adapter.modules.values():
            dtype = torch.promote_types(dtype, torch.promote_types(mod.a.dtype, mod.b.dtype))
    names = sorted({name for adapter in adapters for name in adapter.modules})
    combined: dict[str, LoraModule] = {}
    for name in names:
        present = [(i, a.modules[name]) for i, a in enumerate(adapters) if name in a.modules]
        d_out, d_in = present[0][1].b.shape[0], present[0][1].a.shape[1]
        a_cat = torch.zeros(total, d_in, dtype=torch.float32)  # (R, d_in)
        b_cat = torch.zeros(d_out, total, dtype=torch.float32)  # (d_out, R)
        for i, mod in present:
            if mod.b.shape[0] != d_out or mod.a.shape[1] != d_in:
                raise StackingError(
                    f"{name}: patch {i} has ΔW shape {(mod.b.shape[0], mod.a.shape[1])}, "
                    f"another has {(d_out, d_in)}; the patches target different base models"
                )
            lo, r = offsets[i], mod.rank
            a_cat[lo : lo + r] = mod.a.float()  # (r_i, d_in)
            b_cat[:, lo : lo + r] = mod.scaling * mod.b.float()  # (d_out, r_i)
        combined[name] = LoraModule(a_cat.to(dtype), b_cat.to(dtype), 1.0)
    first = adapters[0].config
    task_types = {a.config.get("task_type") for a in adapters}
    config = {
        "task_type": first.get("task_type") if len(task_types) == 1 else None,
        "base_model_name_or_path": first.get("base_model_name_or_path"),
    }
    return LoraAdapter(combined, config)


def combine_adapters(adapter_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Write the exact stack of `adapter_dirs` (module docstring) as a PEFT adapter at `out_dir`.

    ΔW_m = Σ_i s_i·B_i,m·A_i,m for every module m; config r = lora_alpha = Σ_i w_i, target_modules =
    the union of targeted module paths. Built in a temporary sibling dir ('.<name>.*.tmp') and
    renamed into place, so readers never see a half-written adapter; an existing `out_dir` is
    replaced. Serialise concurrent builds of one `out_dir` in the caller (the result is
    deterministic, so a lost race is harmless).
    Raises StackingError for adapters using features that cannot be stacked (DoRA, modules_to_save,
    bias, …) or whose module shapes disagree."""
    dirs = [Path(d) for d in adapter_dirs]
    stacked = stack_adapters([_load_for_stacking(d) for d in dirs])
    sources = json.dumps([weights_sha256(d) for d in dirs])
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        write_lora_adapter(stacked, tmp, metadata={"safepatch_stack_of": sources})
        fsync_dir(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
