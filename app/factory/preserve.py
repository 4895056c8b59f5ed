"""Base-model behaviour to preserve: chat tokenisation, greedy targets, teacher-forced
log-probabilities and KL divergences. Shared by training (`preserving` mode) and evaluation.

KL(base ‖ patched) at a response position is Σ_v p(v) (log p(v) − log q(v)) with p the base's
and q the patched model's next-token distribution, both teacher-forced on the *base's* greedy
response. Training uses a top-k approximation (the base's k most likely tokens plus one bucket
for the rest: the exact KL of that coarsened distribution, a lower bound of the full KL) so the
base's distributions can be precomputed and cached cheaply; evaluation uses the full vocabulary.

A small KL still flips greedy tokens where the base's top two are nearly tied, and one flip
changes the rest of the answer. `margin_hinge` targets exactly that: it is zero while the base's
greedy token stays the patched model's argmax by at least half the base's own margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of `prompt` as one user turn, with the assistant generation prompt; the same
    ids are fed to vLLM in evaluation so training, KL and serving see identical inputs."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, *, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        sl = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, sl] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, sl] = 1
    return ids, mask


@dataclass
class GreedyTarget:
    prompt_ids: list[int]
    response_ids: list[int]
    top_logprobs: torch.Tensor  # (len(response_ids), k) base log-probs, descending
    top_ids: torch.Tensor  # (len(response_ids), k)


@torch.no_grad()
def greedy_targets(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    top_k: int,
    batch_size: int = 16,
    desc: str = "base greedy targets",
) -> list[GreedyTarget]:
    """The model's greedy responses (stopping at EOS) and its top-k log-probs at each step."""
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[GreedyTarget] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        chunk = [chat_prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        ids, mask = pad_batch(chunk, pad, left=True)
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        logits = torch.stack(gen.logits, dim=1).float()  # (batch, steps, vocab)
        top = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
        new_tokens = gen.sequences[:, ids.shape[1] :]
        for row, prompt_ids in enumerate(chunk):
            tokens = new_tokens[row].tolist()
            length = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            out.append(
                GreedyTarget(
                    prompt_ids,
                    tokens[:length],
                    top.values[row, :length].clone(),
                    top.indices[row, :length].clone(),
                )
            )
    return out


def response_logprobs(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
) -> list[torch.Tensor]:
    """Teacher-forced next-token log-probs (len(response), vocab) for each response token.
    Runs the LM head only on response positions. Gradients flow if enabled by the caller."""
    seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    ids, mask = pad_batch(seqs, pad_id)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    rows, cols, sizes = [], [], []
    for row, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        positions = range(len(p) - 1, len(p) + len(r) - 1)  # position t predicts token t + 1
        rows += [row] * len(r)
        cols += list(positions)
        sizes.append(len(r))
    logits = lm.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)]).float()
    return list(torch.log_softmax(logits, dim=-1).split(sizes))


def full_kl(base_logprobs: torch.Tensor, patched_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(base ‖ patched) per position, from full-vocabulary log-probs (T, V) -> (T,)."""
    return (base_logprobs.exp() * (base_logprobs - patched_logprobs)).sum(-1).clamp(min=0.0)


def topk_kl(
    top_logprobs: torch.Tensor, top_ids: torch.Tensor, patched_logprobs: torch.Tensor
) -> torch.Tensor:
    """KL(base ‖ patched) of the (top-k + rest) coarsening, per position (T,)."""
    q_top = patched_logprobs.gather(-1, top_ids)
    p_rest = (1 - top_logprobs.exp().sum(-1)).clamp(min=1e-8)
    q_rest = (1 - q_top.exp().sum(-1)).clamp(min=1e-8)
    kl_top = (top_logprobs.exp() * (top_logprobs - q_top)).sum(-1)
    return kl_top + p_rest * (p_rest.log() - q_rest.log())


def margin_hinge(
    top_logprobs: torch.Tensor,
    top_ids: torch.Tensor,
    patched_logprobs: torch.Tensor,
    cap: float = 1.0,
) -> torch.Tensor:
    """Per position (T,): relu(τ − m_q). y = top_ids[:, 0] is the base's greedy token,
    m_q = log q(y) − max_{v≠y} log q(v) the patched model's margin for it, and
    τ = min(m_p / 2, cap) with m_p = log p(y) − log p(2nd) the base's own margin. Zero at the
    base model; positive only as the patched model moves toward another greedy token."""
    greedy = top_ids[:, :1]  # (T, 1)
    own = patched_logprobs.gather(-1, greedy).squeeze(-1)  # (T,)
    rival = patched_logprobs.scatter(-1, greedy, float("-inf")).amax(-1)  # (T,)
    wanted = ((top_logprobs[:, 0] - top_logprobs[:, 1]) / 2).clamp(max=cap)  # (T,)
    return (wanted - (own - rival)).clamp(min=0.0)
