"""The trainer's two objectives: refusal cross-entropy on harmful requests, and preservation of
the base model's own behaviour on preserve prompts (top-k KL and the greedy-margin hinge, both
defined in `app.factory.preserve`)."""

from __future__ import annotations

from collections.abc import Sequence
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


def refusal_loss(
    model: Any, batch: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of `batch`."""
    logprobs = response_logprobs(model, [p for p, _ in batch], [r for _, r in batch], pad_id)
    nll = [
        -lp.gather(-1, torch.tensor(r).unsqueeze(-1)).squeeze(-1)
        for lp, (_, r) in zip(logprobs, batch, strict=True)
    ]
    return torch.cat(nll).mean()


def preserve_loss(
    model: Any, batch: Sequence[GreedyTarget], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean top-k KL, mean margin hinge) over the response positions of `batch`."""
    logprobs = response_logprobs(
        model, [t.prompt_ids for t in batch], [t.response_ids for t in batch], pad_id
    )
    pairs = list(zip(batch, logprobs, strict=True))
    kls = torch.cat([topk_kl(t.top_logprobs, t.top_ids, lp) for t, lp in pairs])
    hinges = torch.cat([margin_hinge(t.top_logprobs, t.top_ids, lp) for t, lp in pairs])
    return kls.mean(), hinges.mean()
