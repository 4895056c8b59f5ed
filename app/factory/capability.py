"""Capability check: multiple-choice accuracy by log-likelihood (HellaSwag-style).

Each item is a context and N candidate endings. A model's score for ending e is

    ll(e) = Σ_t log p(e_t | context, e_<t)          (ending tokens only, the context is given)

`acc` counts items where argmax_e ll(e) is the labelled ending; `acc_norm` uses ll(e) / len(e)
with len the ending's length in UTF-8 bytes (lm-evaluation-harness's normalisation, which
removes the bias toward short endings). Context and ending are plain text (no chat template):
the base skill is measured as the benchmark defines it; the ending is tokenised separately with
a leading space and appended to the context's tokens.

Intervals: a Wilson 95 % interval for each accuracy; for a patch's change against the base on
the same items, the paired difference d_i = correct_patch − correct_base has mean Δ and
standard error sd(d)/√n, reported as Δ ± 1.96·SE in points. Paired, it is far tighter than the
difference of two independent intervals, because most items are answered the same way.

`mode` is the hook for how a patch is applied: `always-on` (the LoRA acts on every token) is
what exists; `gated` (the patch only where its gate fires) will plug in here when gated patches
exist, and is refused until then.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from app.factory.preserve import response_logprobs

Mode = Literal["always-on", "gated"]
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Item:
    context: str
    endings: list[str]
    label: int


# One item -> (sum of ending-token log-probs, ending length in bytes) per ending.
Scorer = Callable[[Item], list[tuple[float, int]]]


def load_items(path: Path, limit: int | None = None) -> list[Item]:
    """HellaSwag-format JSONL (`context`, `endings`, `label`); the first `limit` items."""
    items = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            items.append(Item(row["context"], list(row["endings"]), int(row["label"])))
            if limit is not None and len(items) >= limit:
                break
    return items


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion correct/n."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # exact ends at 0/n and n/n (the formula leaves rounding crumbs there)
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    return (low, 1.0 if correct == n else min(1.0, centre + half))


def paired_delta(patched: Sequence[bool], base: Sequence[bool]) -> tuple[float, float]:
    """(Δ, half-width of its 95 % interval), in points: mean and 1.96·SE of d_i."""
    n = len(base)
    if n != len(patched):
        raise ValueError("paired results differ in length")
    if n == 0:
        return (0.0, 0.0)
    d = [int(a) - int(b) for a, b in zip(patched, base, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return (100 * mean, 100 * Z95 * math.sqrt(var / n))


def predictions(scorer: Scorer, items: Sequence[Item], desc: str = "") -> dict[str, list[bool]]:
    """Per item: is the argmax of ll (`acc`) and of ll / bytes (`acc_norm`) the label?"""
    acc, norm = [], []
    for item in tqdm(items, desc=desc or "multiple choice", unit="item"):
        scores = scorer(item)
        lls = [s for s, _ in scores]
        per_byte = [s / max(1, n) for s, n in scores]
        acc.append(max(range(len(lls)), key=lls.__getitem__) == item.label)
        norm.append(max(range(len(per_byte)), key=per_byte.__getitem__) == item.label)
    return {"acc": acc, "acc_norm": norm}


def summarise(
    config: str,
    result: dict[str, list[bool]],
    base: dict[str, list[bool]] | None,
    mode: Mode = "always-on",
) -> dict[str, Any]:
    """Accuracies with Wilson intervals, and the paired change against the base in points."""
    out: dict[str, Any] = {"config": config, "mode": mode, "n": len(result["acc"])}
    for metric in ("acc", "acc_norm"):
        correct = sum(result[metric])
        low, high = wilson(correct, len(result[metric]))
        out[metric] = correct / len(result[metric]) if result[metric] else 0.0
        out[f"{metric}_ci95"] = [low, high]
        if base is not None:
            delta, half = paired_delta(result[metric], base[metric])
            out[f"{metric}_delta_points"] = delta
            out[f"{metric}_delta_ci95_points"] = half
    return out


def model_scorer(model: Any, tokenizer: Any) -> Scorer:
    """ll of every ending under `model` (transformers, optionally peft), one batch per item."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def score(item: Item) -> list[tuple[float, int]]:
        context = tokenizer(item.context, add_special_tokens=False)["input_ids"]
        endings = [tokenizer(" " + e, add_special_tokens=False)["input_ids"] for e in item.endings]
        logprobs = response_logprobs(model, [context] * len(endings), endings, pad)
        return [
            (float(lp.gather(1, torch.tensor(ids)[:, None]).sum()), len(e.encode()))
            for lp, ids, e in zip(logprobs, endings, item.endings, strict=True)
        ]

    return score


def evaluate_capability(
    model_dir: Path,
    configs: Sequence[Any],  # app.factory.evaluate.EvalConfig
    items: Sequence[Item],
    *,
    mode: Mode = "always-on",
) -> list[dict[str, Any]]:
    """Accuracy of the base model and every configuration on `items` (base first)."""
    if mode != "always-on":
        raise NotImplementedError(f"mode {mode!r}: only always-on patches exist so far")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    patched = [c for c in configs if c.adapter_dir is not None]
    if patched:
        model = PeftModel.from_pretrained(
            model, str(patched[0].adapter_dir), adapter_name="cap0"
        ).eval()
        for i, config in enumerate(patched[1:], start=1):
            model.load_adapter(str(config.adapter_dir), adapter_name=f"cap{i}")
    scorer = model_scorer(model, tokenizer)
    if patched:
        with model.disable_adapter():
            base = predictions(scorer, items, "capability: base")
    else:
        base = predictions(scorer, items, "capability: base")
    rows = [summarise("base", base, None, mode)]
    for i, config in enumerate(patched):
        model.set_adapter(f"cap{i}")
        result = predictions(scorer, items, f"capability: {config.name}")
        rows.append(summarise(config.name, result, base, mode))
    return rows


def format_capability(rows: Sequence[dict[str, Any]], benchmark: str) -> str:
    """Fixed-width table: accuracy [95 % CI] and the change against base in points."""
    lines = [f"capability: {benchmark}, {rows[0]['n'] if rows else 0} items, log-likelihood"]
    header = f"{'config':<32} {'mode':<10} {'acc [95% CI]':<24} {'Δ pts':<14} "
    header += f"{'acc_norm [95% CI]':<24} {'Δ pts':<14}"
    lines += [header, "-" * len(header)]
    for r in rows:
        cells = []
        for metric in ("acc", "acc_norm"):
            low, high = r[f"{metric}_ci95"]
            cells.append(f"{100 * r[metric]:5.1f}% [{100 * low:4.1f}, {100 * high:4.1f}]")
            delta = r.get(f"{metric}_delta_points")
            half = r.get(f"{metric}_delta_ci95_points")
            cells.append("-" if delta is None else f"{delta:+.1f} ± {half:.1f}")
        lines.append(
            f"{r['config']:<32} {r['mode']:<10} {cells[0]:<24} {cells[1]:<14} "
            f"{cells[2]:<24} {cells[3]:<14}"
        )
    return "\n".join(lines)
