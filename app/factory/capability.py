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

Modes (`app.patches.gate.Mode`): `always` — the LoRA acts on every token; `gated` — per item,
the patch's gate probes the item's context as the served prompt would be probed (the patched
model's greedy first `probe_tokens` tokens after the context, plain text as scored, through
transformers + peft) and the item is scored with the patched log-likelihoods where the gate
fires and with the base's everywhere else. A probe costs `probe_tokens` greedy steps per item
and configuration, cheap beside the 4-ending scoring; the patched endings are scored only for
items whose gate fires. Where no gate fires, gated accuracy is the base's exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from app.factory.gating import Gate
from app.factory.preserve import response_logprobs
from app.patches.gate import MODES, Mode

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
    mode: Mode | None = None,
) -> dict[str, Any]:
    """Accuracies with Wilson intervals, and the paired change against the base in points."""
    out: dict[str, Any] = {"config": config, "mode": mode or "-", "n": len(result["acc"])}
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
    modes: Sequence[Mode] = ("always",),
    gates: Mapping[str, Gate] | None = None,
) -> list[dict[str, Any]]:
    """Accuracy of the base model and every configuration in each mode on `items` (base
    first); `gates[config]` is the gate a gated configuration is scored with."""
    if not set(modes) <= set(MODES) or ("gated" in modes and gates is None):
        raise ValueError(f"modes must be among {MODES}; gated needs the gates")
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
    rows = [summarise("base", base, None)]
    for i, config in enumerate(patched):
        model.set_adapter(f"cap{i}")
        if "gated" in modes:
            assert gates is not None
            fires = probe_fires(model, tokenizer, items, gates[config.name])
            chosen = [it for it, f in zip(items, fires, strict=True) if f]
            some = predictions(scorer, chosen, f"capability: {config.name} (gated, fired)")
            result = merge_fired(base, some, fires)
            row = summarise(config.name, result, base, "gated")
            rows.append(row | {"fire_rate": sum(fires) / len(fires) if fires else 0.0})
        if "always" in modes:
            result = predictions(scorer, items, f"capability: {config.name}")
            rows.append(summarise(config.name, result, base, "always"))
    return rows


@torch.no_grad()
def probe_fires(model: Any, tokenizer: Any, items: Sequence[Item], gate: Gate) -> list[bool]:
    """Per item: does `gate` fire on the model's greedy first `probe_tokens` tokens after the
    context (the probe a served completion of the context would get)?"""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fires = []
    for item in tqdm(items, desc="capability: gate probes", unit="item"):
        ids = torch.tensor([tokenizer(item.context, add_special_tokens=False)["input_ids"]])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=gate.probe_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        fires.append(gate.fires(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))
    return fires


def merge_fired(
    base: dict[str, list[bool]], fired_results: dict[str, list[bool]], fires: Sequence[bool]
) -> dict[str, list[bool]]:
    """Per metric: the patched result (in order, for the fired items) where the gate fires,
    the base's elsewhere."""
    out: dict[str, list[bool]] = {}
    for metric, values in base.items():
        patched = iter(fired_results[metric])
        out[metric] = [next(patched) if f else v for v, f in zip(values, fires, strict=True)]
    return out


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
