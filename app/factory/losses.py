"""The trainer's two objectives: refusal cross-entropy on harmful requests, and preservation of
the base model's own behaviour on preserve prompts (top-k KL and the greedy-margin hinge, both
defined in `app.factory.preserve`).

Both are weighted means over response positions. Whether an answer is a refusal is decided in
its first few tokens ("I'm sorry" vs "I'm glad"); the rest of a refusal is easy once begun.
A uniform mean dilutes that decision by the response length, so the first `decision_tokens`
positions can weigh `decision_weight` times the others:

    loss = Σ_t w_t ℓ_t / Σ_t w_t,   w_t = decision_weight if t < decision_tokens else 1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.factory.preserve import (
    GreedyTarget,
    chat_prompt_ids,
    margin_hinge,
    response_logprobs,
    topk_kl,
)
from app.factory.templates import refusal_for


def refusal_examples(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    seed: int,
    category: str | None,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, refusal ids + EOS) per prompt, the refusal from `templates.refusal_for`."""
    eos = tokenizer.eos_token_id
    examples = []
    for prompt in prompts:
        response = refusal_for(prompt, seed=seed, category=category)
        ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [eos]
        examples.append((chat_prompt_ids(tokenizer, prompt), ids))
    return examples


@dataclass(frozen=True)
class Decision:
    """How much the first response positions weigh (module docstring); the default is uniform."""

    tokens: int = 0
    weight: float = 1.0

    def weights(self, length: int) -> torch.Tensor:
        """(length,) position weights w_t."""
        w = torch.ones(length)
        w[: self.tokens] = self.weight
        return w


def weighted_mean(values: Sequence[torch.Tensor], decision: Decision) -> torch.Tensor:
    """Σ w_t v_t / Σ w_t over every response position of a batch (one (T,) tensor per row)."""
    weights = torch.cat([decision.weights(len(v)) for v in values])
    return (torch.cat(list(values)) * weights).sum() / weights.sum()


def refusal_loss(
    model: Any,
    batch: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    decision: Decision = Decision(),
) -> torch.Tensor:
    """Weighted mean cross-entropy over the response tokens of `batch`."""
    logprobs = response_logprobs(model, [p for p, _ in batch], [r for _, r in batch], pad_id)
    nll = [
        -lp.gather(-1, torch.tensor(r).unsqueeze(-1)).squeeze(-1)
        for lp, (_, r) in zip(logprobs, batch, strict=True)
    ]
    return weighted_mean(nll, decision)


def preserve_loss(
    model: Any, batch: Sequence[GreedyTarget], pad_id: int, decision: Decision = Decision()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted mean top-k KL, weighted mean margin hinge) over the response positions."""
    logprobs = response_logprobs(
        model, [t.prompt_ids for t in batch], [t.response_ids for t in batch], pad_id
    )
    pairs = list(zip(batch, logprobs, strict=True))
    kls = [topk_kl(t.top_logprobs, t.top_ids, lp) for t, lp in pairs]
    hinges = [margin_hinge(t.top_logprobs, t.top_ids, lp) for t, lp in pairs]
    return weighted_mean(kls, decision), weighted_mean(hinges, decision)
