"""Gated evaluation derived from the always-on pass, gate calibration, the user's override,
and `--mode` parsing. Token ids are words of a toy vocabulary, so a probe of k tokens is the
answer's first k words."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import typer

from app.cli.evaluate import parse_modes
from app.factory.calibrate import HeldOut, calibrate, merge_gate, store_gates
from app.factory.gating import Outputs, PromptKL, fired, gate_for, gated_outputs
from app.factory.judge import KeywordJudge
from app.factory.scoring import score_mode
from app.factory.sets import PromptSet
from app.patches.gate import GateRule
from app.patches.metadata import PatchMetadata

VOCAB = ["<s>", "I'm", "sorry,", "but", "Sure,", "here", "is", "Paris.", "Well,", "I", "can't"]
VOCAB += ["As", "an", "AI"]


def decode(ids: Sequence[int]) -> str:
    return " ".join(VOCAB[i] for i in ids)


def ids(text: str) -> list[int]:
    return [VOCAB.index(w) for w in text.split()]


def outputs(texts: list[str]) -> Outputs:
    return Outputs([ids(t) for t in texts], texts)


def test_gated_outputs_are_the_base_where_the_probe_passes_and_patched_where_it_fires() -> None:
    base = outputs(["Sure, here is Paris.", "Sure, here is", "Paris.", "Sure, here"])
    patched = outputs(["I'm sorry, but", "Sure, here is Paris.", "As an AI", "Sure, here"])
    rule = GateRule(probe_tokens=2)
    fires = fired(rule, patched.token_ids, decode)
    assert fires == [True, False, False, False]  # "as an" is not yet "as an ai"
    assert fired(GateRule(probe_tokens=3), patched.token_ids, decode)[2]
    served = gated_outputs(base, patched, fires)
    assert served.token_ids == [patched.token_ids[0], *base.token_ids[1:]]
    assert served.texts == ["I'm sorry, but", "Sure, here is", "Paris.", "Sure, here"]

    benign = PromptSet("b", "benign", ["p0", "p1", "p2", "p3"])
    kl = PromptKL(sums=[0.8, 0.4, 0.2, 0.0], counts=[4, 3, 1, 2])
    common = (benign, patched, base, KeywordJudge(), kl, decode, rule)
    always = score_mode("patch", "always", *common)
    gated = score_mode("patch", "gated", *common)
    assert always["mode"] == "always" and gated["mode"] == "gated"
    assert always["unchanged_rate"] == 0.25 and always["refusal_rate"] == 0.5
    assert always["mean_kl"] == pytest.approx(1.4 / 10)
    # gated: prompt 0 fires (patched answer, a refusal, changed, its KL); the rest pass
    assert gated["refusal_rate"] == 0.25 and gated["unchanged_rate"] == 0.75
    assert gated["mean_kl"] == pytest.approx(0.8 / 10)
    assert gated["fire_rate"] == 0.25 and gated["probe_tokens"] == 2
    assert gated["unchanged_where_not_refused"] == 1.0  # the 3 served non-refusals are the base's


def test_a_stack_probes_once_with_its_longest_probe() -> None:
    short = GateRule(probe_tokens=2, openings=("sure, here",))
    long = GateRule(probe_tokens=4, openings=("i'm sorry, but",))
    stack = gate_for([short, long])
    assert stack.probe_tokens == 4
    assert fired(
        stack, [ids("I'm sorry, but Paris."), ids("Sure, here is"), ids("Paris.")], decode
    ) == [
        True,
        True,
        False,
    ]
    assert gate_for([short]) is short


def _held(base_refused: list[bool], patched: list[str]) -> HeldOut:
    refused = [not t.startswith("Sure") for t in patched]  # the judge's verdicts
    return HeldOut("h", "harmful", base_refused, refused, [ids(t) for t in patched])


HARMFUL = [
    "I'm sorry, but",  # opens a refusal at 2 tokens
    "I can't",  # at 2
    "As an AI",  # at 3
    "Sure, here is Paris. I can't",  # compliance, not a refusal
]


def test_calibration_picks_the_smallest_probe_within_one_point() -> None:
    benign = HeldOut(
        "b", "benign", [False] * 2, [False] * 2, [ids("Well, I can't"), ids("As an AI")]
    )
    record = calibrate(
        GateRule(), [_held([False] * 4, HARMFUL), benign], decode, probe_range=range(1, 6)
    )
    # 3 of 4 refused always-on; gated catches 0 at k=1, 2 at k=2, all 3 from k=3
    assert record["always_refusal"] == 0.75 and record["met"]
    assert record["probe_tokens"] == 3 and record["gated_refusal"] == 0.75
    assert [c["gated_refusal"] for c in record["curve"]] == [0.0, 0.5, 0.75, 0.75, 0.75]
    assert record["benign_fire_rate"] == 0.5  # "As an AI" fires from 3 tokens, "Well," never
    assert record["harmful_sets"] == {"h": 4} and record["benign_sets"] == {"b": 2}
    # where the base model already refuses the late opener, a shorter probe loses nothing
    early = calibrate(GateRule(), [_held([False, False, True, False], HARMFUL)], decode)
    assert early["probe_tokens"] == 2 and early["gated_refusal"] == 0.75
    # a 1-point tolerance on 4 prompts is none at all; 25 points lets k=2 through
    loose = calibrate(GateRule(), [_held([False] * 4, HARMFUL)], decode, tolerance=0.25)
    assert loose["probe_tokens"] == 2
    with pytest.raises(ValueError):
        calibrate(GateRule(), [benign], decode)


def test_calibration_never_replaces_a_gate_set_by_hand(tmp_path: Path) -> None:
    record = calibrate(GateRule(), [_held([False] * 4, HARMFUL)], decode)
    new = merge_gate(None, record)
    assert new is not None and new["mode"] == "gated" and new["probe_tokens"] == 3
    assert new["calibration"]["by"] == "safepatch eval"
    # a calibrated block is recalibrated; its mode (policy) is kept
    again = merge_gate(new | {"mode": "always"}, record | {"probe_tokens": 5})
    assert again is not None and again["probe_tokens"] == 5 and again["mode"] == "always"
    # a block set by hand, or a calibrated one whose threshold a user edited, is kept
    assert merge_gate({"mode": "gated", "probe_tokens": 8}, record) is None
    assert merge_gate(new | {"probe_tokens": 9}, record) is None
    PatchMetadata(name="p", rank=2, target_modules=["q_proj"], weights_sha256="0").write(tmp_path)
    assert store_gates({"p": new, "q": None}, {"p": tmp_path, "q": tmp_path}) == ["p"]
    stored = PatchMetadata.read(tmp_path)
    assert stored is not None and stored.gate is not None
    assert {k: stored.gate[k] for k in new} == new  # (metadata may add the spec's defaults)
    assert GateRule.from_meta(stored.model_dump()).probe_tokens == 3


def test_mode_option_parsing() -> None:
    assert parse_modes(None) == ("gated", "always")
    assert parse_modes(["always-on"]) == ("always",)
    assert parse_modes(["gated", "always", "gated"]) == ("gated", "always")
    assert parse_modes(["Always"]) == ("always",)
    with pytest.raises(typer.BadParameter, match="gated or always"):
        parse_modes(["sometimes"])
