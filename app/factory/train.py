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
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from app.factory.cache import load_cached, save_cached
from app.factory.data import PromptSource, file_sha256, load_prompts, normalise
from app.factory.losses import preserve_loss, refusal_examples, refusal_loss
from app.factory.preserve import GreedyTarget, chat_prompt_ids, greedy_targets
from app.factory.selective import (
    cached_moments,
    constrain_lora_inputs,
    materialise_lora_inputs,
    selective_bases,
)
from app.factory.writer import write_patch

Mode = Literal["safety-only", "preserving"]
DEFAULT_TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]


@dataclass
class TrainConfig:
    model_dir: Path
    out_dir: Path
    name: str
    harmful: list[PromptSource]
    preserve: list[PromptSource] = field(default_factory=list)
    mode: Mode = "preserving"
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    layers: list[int] | None = None
    lr: float = 2e-4
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 8
    preserve_batch_size: int = 8
    preserve_weight: float = 1.0
    margin_weight: float = 0.0  # >0: add margin_weight × mean margin hinge (preserve.py)
    preserve_tokens: int = 32
    kl_top_k: int = 64
    selective_dims: int = 0  # >0: keep LoRA A in the top harm-selective input directions
    selective_tail: int = 0  # >0: harmful moments from each prompt's last N tokens only
    selective_against: list[PromptSource] = field(default_factory=list)  # quiet on these too
    seed: int = 0
    refusal_category: str | None = None
    refusal_tokens: int = 0  # >0: the refusal loss covers only each response's first N tokens
    description: str = ""
    categories: list[str] = field(default_factory=list)
    command: str = ""
    cache_dir: Path | None = None
    threads: int | None = None  # torch intra-op threads; None: torch's default


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    initial_loss: float  # refusal CE on a fixed probe of training examples, before training
    final_loss: float  # the same probe after training
    losses: list[float]
    seconds: float


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
    if missing:
        fresh = greedy_targets(
            model, tokenizer, missing, max_new_tokens=config.preserve_tokens, top_k=config.kl_top_k
        )
        for prompt, target in zip(missing, fresh, strict=True):
            found[prompt] = target
            save_cached(asdict(target), path_of(prompt))
    return [found[p] for p in prompts]


def _cycle(items: list[Any], batch: int, rng: random.Random):  # -> Iterator[list[Any]]
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
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    if config.selective_against and not config.selective_dims:  # before minutes of set-up
        raise ValueError("--selective-against needs --selective-dims")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=torch.float32)

    harmful = _dedup(p for src in config.harmful for p in load_prompts(src))
    if not harmful:
        raise ValueError("no harmful training prompts after filtering and splitting")
    examples = refusal_examples(
        tokenizer,
        harmful,
        seed=config.seed,
        category=config.refusal_category,
        max_tokens=config.refusal_tokens,
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
    model = get_peft_model(model, lora)
    lora_inputs = (
        _selective_lora_inputs(config, model, tokenizer, examples, targets, pad_id)
        if config.selective_dims
        else []
    )
    constrain_lora_inputs(lora_inputs, config.seed)  # before the optimiser sees the params
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    steps = config.steps or max(1, math.ceil(config.epochs * len(examples) / config.batch_size))
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / steps)
    )
    probe = examples[: min(len(examples), 16)]

    model.eval()
    with torch.no_grad():
        initial = float(refusal_loss(model, probe, pad_id))
    model.train()
    harm_batches = _cycle(examples, min(config.batch_size, len(examples)), rng)
    keep_batches = (
        _cycle(targets, min(config.preserve_batch_size, len(targets)), rng) if targets else None
    )
    losses: list[float] = []
    bar = tqdm(range(steps), desc=f"training {config.name} ({config.mode})", unit="step")
    for _ in bar:
        ce = refusal_loss(model, next(harm_batches), pad_id)
        loss = ce
        postfix = {"ce": f"{ce.item():.3f}"}
        if keep_batches is not None:
            kl, hinge = preserve_loss(model, next(keep_batches), pad_id)
            loss = ce + config.preserve_weight * kl + config.margin_weight * hinge
            postfix["kl"] = f"{kl.item():.4f}"
            postfix["hinge"] = f"{hinge.item():.4f}"
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(postfix)
    model.eval()
    with torch.no_grad():
        final = float(refusal_loss(model, probe, pad_id))
    materialise_lora_inputs(m for m, _ in lora_inputs)
    seconds = time.monotonic() - started
    write_patch(config, model, steps, initial, final, seconds, len(examples), len(targets))
    return TrainResult(config.out_dir, steps, initial, final, losses, seconds)


def _selective_lora_inputs(
    config: TrainConfig,
    model: Any,
    tokenizer: Any,
    examples: list[tuple[list[int], list[int]]],
    targets: list[GreedyTarget],
    pad_id: int,
) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """(lora_A module, basis) per patched module (`app.factory.selective`): harmful = the
    refusal prompts, benign = the preserve prompts with the base's answers, plus the
    `selective_against` requests as a group of their own. Moments are taken through the fresh
    peft model, whose B = 0 makes it the base model."""
    if not targets:
        raise ValueError("--selective-dims needs preserving mode and preserve prompts")
    backbone = model.get_base_model().model  # no LM head: moments need only the layers
    lora_modules = {n: m for n, m in backbone.named_modules() if hasattr(m, "lora_A")}
    against = _dedup(p for src in config.selective_against for p in load_prompts(src))
    bases = selective_bases(
        cached_moments(
            backbone,
            list(lora_modules),
            harmful=[p for p, _ in examples],
            benign=[(t.prompt_ids, t.response_ids) for t in targets],
            against=[chat_prompt_ids(tokenizer, p) for p in against],
            tail=config.selective_tail,
            pad_id=pad_id,
            cache_root=config.cache_dir and config.cache_dir / "factory" / "moments",
            cache_salt=str(targets_cache_dir(config)),
        ),
        config.selective_dims,
    )
    return [(m.lora_A["default"], bases[n]) for n, m in lora_modules.items()]


def _dedup(prompts: Any) -> list[str]:
    seen: dict[str, str] = {}
    for prompt in prompts:
        seen.setdefault(normalise(prompt), prompt)
    return list(seen.values())
