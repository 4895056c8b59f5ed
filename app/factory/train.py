"""LoRA refusal-SFT: the patch factory's trainer.

Harmful prompts get a refusal from `app.factory.templates` as the assistant turn; the loss is
cross-entropy on the response tokens only (prompt tokens are context). Modes:

* `safety-only` — the paper's recipe: refusal data alone.
* `preserving` — adds `preserve_weight ×` the mean top-k KL(base ‖ patched) over the base
  model's own greedy responses to *preserve* prompts (benign instructions; for a category patch
  also requests from other categories), plus `margin_weight ×` the mean margin hinge that
  keeps each base greedy token the patched model's argmax (`preserve.margin_hinge`). The
  targets come from the base model itself (generated once, cached under `cache_dir/factory/`),
  so no external "general" dataset is needed.

Each step draws `batch_size` refusal examples and, in preserving mode, `preserve_batch_size`
preserve examples, cycling through seeded shuffles of each pool.

`train_patch` is three steps a recipe can also call one by one (bench/experiments/):
`prepare` (data, base targets, the LoRA model, harm-selective inputs), `fit` (the loop) and
`finish` (refusal loss after, gate calibration, `app.factory.writer.write_patch`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from app.factory.cache import load_cached, save_cached
from app.factory.config import TrainConfig
from app.factory.data import file_sha256, load_prompts, normalise
from app.factory.losses import Decision, preserve_loss, refusal_examples, refusal_loss
from app.factory.preserve import GreedyTarget, greedy_targets
from app.factory.selective import (
    cached_moments,
    constrain_lora_inputs,
    materialise_lora_inputs,
    selective_bases,
)
from app.factory.writer import write_patch

Example = tuple[list[int], list[int]]  # (prompt ids, refusal ids)
TARGET_CHUNK = 64  # base targets generated (and cached) per chunk


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    initial_loss: float  # refusal CE on a fixed probe of training examples, before training
    final_loss: float  # the same probe after training
    losses: list[float]
    seconds: float


@dataclass
class Setup:
    """Everything the loop needs: the LoRA model, its tokenizer and data."""

    model: Any  # peft model, LoRA A possibly constrained to harm-selective inputs
    tokenizer: Any
    pad_id: int
    examples: list[Example]
    targets: list[GreedyTarget]
    lora_inputs: list[tuple[torch.nn.Module, torch.Tensor]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


def targets_cache_dir(config: TrainConfig) -> Path | None:
    """Per-prompt cache of base greedy targets, keyed by model weights and target settings."""
    from app.model.identity import model_identity

    if config.cache_dir is None:
        return None
    weights = config.model_dir / "model.safetensors"
    key = hashlib.sha256(
        json.dumps(
            [
                model_identity(config.model_dir),
                file_sha256(weights) if weights.is_file() else "",
                config.preserve_tokens,
                config.kl_top_k,
            ]
        ).encode()
    ).hexdigest()[:24]
    return config.cache_dir / "factory" / "targets" / key


def _cached_targets(
    config: TrainConfig, model: Any, tokenizer: Any, prompts: list[str]
) -> list[GreedyTarget]:
    root = targets_cache_dir(config)

    def path_of(prompt: str) -> Path | None:
        return root / f"{hashlib.sha256(prompt.encode()).hexdigest()[:32]}.pt" if root else None

    found: dict[str, GreedyTarget] = {}
    for prompt in prompts:
        if (cached := load_cached(path_of(prompt))) is not None:
            found[prompt] = GreedyTarget(**cached)
    missing = [p for p in prompts if p not in found]
    # In chunks, each cached as it is done: an interrupted run resumes where it stopped.
    for start in range(0, len(missing), TARGET_CHUNK):
        chunk = missing[start : start + TARGET_CHUNK]
        fresh = greedy_targets(
            model,
            tokenizer,
            chunk,
            max_new_tokens=config.preserve_tokens,
            top_k=config.kl_top_k,
            desc=f"base greedy targets {start + len(chunk)}/{len(missing)}",
        )
        for prompt, target in zip(chunk, fresh, strict=True):
            found[prompt] = target
            save_cached(asdict(target), path_of(prompt))
    return [found[p] for p in prompts]


def _cycle(items: list[Any], batch: int, rng: random.Random) -> Iterator[list[Any]]:
    order: list[Any] = []
    while True:
        if len(order) < batch:
            fresh = items[:]
            rng.shuffle(fresh)
            order += fresh
        yield order[:batch]
        order = order[batch:]


def train_patch(config: TrainConfig) -> TrainResult:
    """Train, then write `config.out_dir` (PEFT adapter + safepatch.json + README.md)."""
    setup = prepare(config)
    return finish(config, setup, fit(config, setup))


def prepare(config: TrainConfig) -> Setup:
    """Load the model and data, build refusal examples and base targets, wrap the LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=torch.float32)
    harmful = _dedup(p for src in config.harmful for p in load_prompts(src))
    if not harmful:
        raise ValueError("no harmful training prompts after filtering and splitting")
    examples = refusal_examples(
        tokenizer, harmful, seed=config.seed, category=config.refusal_category
    )
    targets: list[GreedyTarget] = []
    if config.mode == "preserving":
        preserve = _dedup(p for src in config.preserve for p in load_prompts(src))
        if not preserve:
            raise ValueError("preserving mode needs preserve prompts (--preserve FILE)")
        targets = _cached_targets(config, model, tokenizer, preserve)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=config.target_modules,
        layers_to_transform=config.layers,
        task_type="CAUSAL_LM",
        init_lora_weights=True,
    )
    setup = Setup(get_peft_model(model, lora), tokenizer, pad_id, examples, targets)
    if config.selective_dims:
        setup.lora_inputs = selective_lora_inputs(config, setup)
    constrain_lora_inputs(setup.lora_inputs, config.seed)  # before the optimiser sees them
    return setup


def fit(config: TrainConfig, setup: Setup) -> list[float]:
    """The training loop (AdamW, warm-up then linear decay); returns the loss per step."""
    model, pad_id = setup.model, setup.pad_id
    rng = random.Random(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    steps = config.steps or max(
        1, math.ceil(config.epochs * len(setup.examples) / config.batch_size)
    )
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / steps)
    )
    harm = _cycle(setup.examples, min(config.batch_size, len(setup.examples)), rng)
    keep = _cycle(setup.targets, min(config.preserve_batch_size, len(setup.targets)), rng)
    decision = Decision(config.decision_tokens, config.decision_weight)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=f"training {config.name} ({config.mode})", unit="step")
    for _ in bar:
        ce = refusal_loss(model, next(harm), pad_id, decision)
        loss, postfix = ce, {"ce": f"{ce.item():.3f}"}
        if setup.targets:
            kl, hinge = preserve_loss(model, next(keep), pad_id, decision)
            loss = ce + config.preserve_weight * kl + config.margin_weight * hinge
            postfix |= {"kl": f"{kl.item():.4f}", "hinge": f"{hinge.item():.4f}"}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(postfix)
    model.eval()
    return losses


def finish(config: TrainConfig, setup: Setup, losses: list[float], **extra: Any) -> TrainResult:
    """Refusal loss before/after on a fixed probe, the gate's calibration on the dev split,
    then the patch on disk; `extra` joins the metadata's training record (recipes)."""
    from app.factory.calibrate import calibrate_trained

    initial = _initial_loss(config, setup)
    with torch.no_grad():
        final = float(refusal_loss(setup.model, _probe(setup), setup.pad_id))
    materialise_lora_inputs(m for m, _ in setup.lora_inputs)
    gate = (
        calibrate_trained(config, setup.model, setup.tokenizer) if config.calibrate_gate else None
    )
    seconds = time.monotonic() - setup.started
    data_files = sorted({str(src.path) for src in config.harmful + config.preserve})
    record = {
        "steps": len(losses),
        "n_harmful": len(setup.examples),
        "n_preserve": len(setup.targets),
        "data_sha256": {f: file_sha256(Path(f)) for f in data_files},
        "initial_refusal_loss": round(initial, 4),
        "final_refusal_loss": round(final, 4),
        "training_seconds": round(seconds, 1),
        "torch": torch.__version__,
    }
    write_patch(config, setup.model, record | extra, gate)
    return TrainResult(config.out_dir, len(losses), initial, final, losses, seconds)


def _probe(setup: Setup) -> list[Example]:
    return setup.examples[: min(len(setup.examples), 16)]


def _initial_loss(config: TrainConfig, setup: Setup) -> float:
    """The probe's refusal loss of the untrained patch: the base model (B = 0), taken with
    the adapter switched off so it needs no copy of the initial weights."""
    with torch.no_grad(), setup.model.disable_adapter():
        return float(refusal_loss(setup.model, _probe(setup), setup.pad_id))


def selective_lora_inputs(
    config: TrainConfig, setup: Setup, moments: dict[str, dict[str, torch.Tensor]] | None = None
) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """(lora_A module, basis) per patched module (`app.factory.selective`): harmful = the
    refusal prompts, benign = the preserve prompts with the base's answers (`moments`, when
    given, replaces the cached ones: recipes add groups of their own). Moments are taken
    through the fresh peft model, whose B = 0 makes it the base model."""
    if not setup.targets:
        raise ValueError("--selective-dims needs preserving mode and preserve prompts")
    backbone = setup.model.get_base_model().model  # no LM head: moments need only the layers
    lora_modules = {n: m for n, m in backbone.named_modules() if hasattr(m, "lora_A")}
    if moments is None:
        moments = cached_moments(
            backbone,
            list(lora_modules),
            harmful=[p for p, _ in setup.examples],
            benign=[(t.prompt_ids, t.response_ids) for t in setup.targets],
            tail=config.selective_tail,
            pad_id=setup.pad_id,
            cache_root=config.cache_dir and config.cache_dir / "factory" / "moments",
            cache_salt=str(targets_cache_dir(config)),
        )
    bases = selective_bases(moments, config.selective_dims)
    return [(m.lora_A["default"], bases[n]) for n, m in lora_modules.items()]


def _dedup(prompts: Any) -> list[str]:
    seen: dict[str, str] = {}
    for prompt in prompts:
        seen.setdefault(normalise(prompt), prompt)
    return list(seen.values())
