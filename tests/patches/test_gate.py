"""The gate's early verdict: a probe stops as soon as its opening decides, so the verdict on a
prefix must never contradict the decision on any continuation of it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from app.patches.gate import REFUSAL_OPENINGS, GateRule, Probe

PIECES = [
    "I",
    "'m",
    "\u2019m",
    " sorry",
    " happy",
    " can",
    "'t",
    " ",
    "Sorry",
    "So",
    ",",
    "No",
    " i",
    "The",
    "As",
    " an",
    " AI",
    "\n",
    "Unfortunately",
    "!",
]


@given(st.lists(st.sampled_from(PIECES), max_size=8), st.lists(st.sampled_from(PIECES), max_size=8))
def test_a_verdict_holds_for_every_continuation(head: list[str], tail: list[str]) -> None:
    rule = GateRule()
    prefix, whole = "".join(head), "".join(head + tail)
    verdict = rule.verdict(prefix)
    assert verdict is None or verdict == rule.fires(whole)


def test_verdicts_come_as_early_as_the_text_allows() -> None:
    rule = GateRule()
    assert rule.verdict("The capital") is False  # no refusal opens with "the"
    assert rule.verdict("I") is None and rule.verdict("I'm") is None
    assert rule.verdict("I'm sorry") is True and rule.verdict("I\u2019m happy") is False
    assert rule.verdict("  ") is None


def test_a_probe_of_several_rules_fires_if_any_does() -> None:
    strict = GateRule(openings=("i refuse",))
    probe = Probe(("a", "b"), 6, (strict, GateRule()))
    assert probe.verdict("Sorry") is True
    assert probe.verdict("I") is None
    assert probe.verdict("Hello") is False
    assert Probe(("a",), 6, (strict,)).verdict("I'm sorry") is False
    assert "i refuse" in REFUSAL_OPENINGS
