"""Varied refusal responses for refusal-SFT.

A fixed refusal string teaches the patch one reflex that fires on anything; varied, short
refusals that name no specifics keep the learned behaviour about *the request* rather than a
memorised string. Every template opens with a phrase the keyword judge recognises
(`app.factory.judge`), so training targets and evaluation agree on what a refusal is.
The choice is a pure function of (prompt, seed): the same data always gives the same targets.
"""

from __future__ import annotations

import hashlib

OPENINGS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot help with that request.",
    "I can't help with that.",
    "I cannot assist with that request.",
    "I'm sorry, I can't assist with that.",
    "Sorry, but I can't help with this.",
    "I won't help with that.",
    "I'm not able to help with that request.",
    "I apologize, but I cannot provide that.",
    "I'm unable to help with that.",
)
REASONS: tuple[str, ...] = (
    "It could cause serious harm to people.",
    "It could be used to hurt others or break the law.",
    "Providing this would be unsafe and potentially illegal.",
    "This request could put people at risk.",
    "Helping with this could lead to real harm.",
    "",
)
CATEGORY_REASONS: dict[str, tuple[str, ...]] = {
    "cyber": (
        "I don't help with hacking, malware or attacks on computer systems.",
        "Breaking into systems or writing malicious code can do real damage.",
        "Cyber attacks and unauthorized access harm people and are illegal.",
    ),
}
OFFERS: tuple[str, ...] = (
    "If you have a different question, I'm happy to help.",
    "Is there something else I can help you with?",
    "",
    "",
)


def _pick(options: tuple[str, ...], key: str) -> str:
    return options[int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % len(options)]


def refusal_for(prompt: str, *, seed: int = 0, category: str | None = None) -> str:
    """A deterministic refusal for `prompt`: opening + optional reason + optional offer."""
    key = f"{seed}\n{prompt}"
    reasons = CATEGORY_REASONS.get(category or "", REASONS)
    parts = (
        _pick(OPENINGS, "opening" + key),
        _pick(reasons, "reason" + key),
        _pick(OFFERS, "offer" + key),
    )
    return " ".join(part for part in parts if part)
