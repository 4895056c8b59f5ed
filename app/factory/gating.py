"""Gated evaluation, derived from the always-on engine pass (no second pass).

In serving, a gated patch (or a stack of them, probing as its exact stack) first decodes its
first `probe_tokens` tokens greedily on exactly the prompt that will be served; if the probe
opens like a refusal (`app.patches.gate.GateRule.fires`) the answer is the patched model's,
otherwise the base's. The evaluation already has both greedy answers, and the probe is greedy
on the same prompt, so its tokens are the first `probe_tokens` tokens of the patched greedy
answer. Per prompt i:

    fired_i   = rule.fires(decode(patched_ids_i[:probe_tokens]))
    gated_i   = patched_i if fired_i else base_i                  (token ids and text)
    KL sum_i  = the patched KL sum of prompt i if fired_i else 0   (teacher-forced on the base)

so the gated unchanged rate counts every passed prompt as unchanged (it is the base's answer
by construction), and the gated mean KL is Σ_fired KL sum_i / Σ_all tokens_i.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from app.patches.gate import GateRule, Probe

Decode = Callable[[Sequence[int]], str]


class Gate(Protocol):
    """A `GateRule` (one patch) or a `Probe` (a stack: one decision for all its patches)."""

    probe_tokens: int

    def fires(self, probe_text: str) -> bool: ...


@dataclass
class Outputs:
    token_ids: list[list[int]]
    texts: list[str]


@dataclass(frozen=True)
class PromptKL:
    """Per prompt of a set: Σ_t KL(base ‖ config) over the base's response tokens, and the
    number of those tokens (the same for every configuration)."""

    sums: list[float]
    counts: list[int]

    def mean(self, keep: Sequence[bool] | None = None) -> float:
        """Token-weighted mean over the set; `keep[i]` False counts prompt i as KL 0."""
        total = sum(self.counts)
        kept = self.sums if keep is None else [s for s, k in zip(self.sums, keep, strict=True) if k]
        return sum(kept) / total if total else 0.0


def gate_for(rules: Sequence[GateRule]) -> Gate:
    """One patch's rule, or the stack's probe: the longest probe, firing when any rule fires."""
    if len(rules) == 1:
        return rules[0]
    names = [str(i) for i in range(len(rules))]
    probe = Probe.for_patches(
        dict(zip(names, rules, strict=True)), dict.fromkeys(names, "gated"), names
    )
    assert probe is not None
    return probe


def fired(gate: Gate, patched_ids: Sequence[Sequence[int]], decode: Decode) -> list[bool]:
    """Whether the gate fires on each prompt: its probe is the patched answer's first tokens."""
    return [gate.fires(decode(ids[: gate.probe_tokens])) for ids in patched_ids]


def gated_outputs(base: Outputs, patched: Outputs, fires: Sequence[bool]) -> Outputs:
    """What a gated deployment serves: the patched answer where the gate fires, else the base's."""
    pick = list(
        zip(fires, base.token_ids, patched.token_ids, base.texts, patched.texts, strict=True)
    )
    return Outputs(
        [list(p_ids if f else b_ids) for f, b_ids, p_ids, _, _ in pick],
        [p_text if f else b_text for f, _, _, b_text, p_text in pick],
    )
