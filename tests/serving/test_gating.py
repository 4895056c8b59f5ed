"""The probe's reader: several prompts in one completions request each get a verdict; the
probe passes early only when all of them can no longer fire."""

from __future__ import annotations

import json

from app.patches.gate import GateRule, Probe
from app.serving.gating import _ProbeReader, _prompts_in

PROBE = Probe(("p",), 6, (GateRule(),))


def event(index: int, text: str) -> str:
    return "data: " + json.dumps({"choices": [{"index": index, "text": text}]})


def test_one_prompt_that_cannot_refuse_passes_at_once() -> None:
    reader = _ProbeReader(PROBE, 1)
    reader.feed(event(0, "The"))
    assert reader.verdict() is False


def test_every_prompt_of_a_batch_must_pass_and_any_may_fire() -> None:
    reader = _ProbeReader(PROBE, 2)
    reader.feed(event(0, "The"))
    assert reader.verdict() is None  # the second prompt has not spoken yet
    reader.feed(event(1, "I"))
    assert reader.verdict() is None
    reader.feed(event(1, "'m sorry"))
    assert reader.verdict() is True and reader.fires()


def test_what_is_not_a_choice_is_ignored() -> None:
    reader = _ProbeReader(PROBE, 1)
    for line in ("data: [DONE]", ": ping", 'data: {"usage": {}}'):
        reader.feed(line)
    assert reader.verdict() is None and not reader.fires()


def test_prompts_in_a_request() -> None:
    assert _prompts_in({"messages": []}) == 1
    assert _prompts_in({"prompt": "hi"}) == 1
    assert _prompts_in({"prompt": [1, 2, 3]}) == 1  # token ids of one prompt
    assert _prompts_in({"prompt": ["a", "b"]}) == 2
    assert _prompts_in({"prompt": [[1], [2], [3]]}) == 3
