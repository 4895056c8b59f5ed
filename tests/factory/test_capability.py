"""The capability scorer (log-likelihood multiple choice) on fixtures with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from app.factory.capability import (
    Item,
    evaluate_capability,
    format_capability,
    load_items,
    model_scorer,
    paired_delta,
    predictions,
    summarise,
    wilson,
)

ITEMS = [
    Item("A man sits on a roof. He", ["eats a shoe.", "removes the old shingles.", "a", "b"], 1),
    Item("She grabs the barbell and", ["sings.", "flies away.", "lifts it overhead.", "c"], 2),
    Item("The dog runs to the ball and", ["brings it back.", "melts.", "x", "y"], 0),
    Item("He opens the oven and", ["d", "e", "f", "takes out the bread."], 3),
]


def known(item: Item, prefer: int) -> list[tuple[float, int]]:
    """Known log-likelihoods: ending `prefer` gets −1 nat, every other ending −50."""
    return [(-1.0 if i == prefer else -50.0, len(e.encode())) for i, e in enumerate(item.endings)]


def test_a_model_that_prefers_the_labelled_ending_scores_100() -> None:
    result = predictions(lambda item: known(item, item.label), ITEMS)
    assert result == {"acc": [True] * 4, "acc_norm": [True] * 4}
    row = summarise("oracle", result, None)
    assert row["acc"] == row["acc_norm"] == 1.0 and row["n"] == 4


def test_a_model_that_prefers_another_ending_scores_0() -> None:
    result = predictions(lambda item: known(item, (item.label + 1) % 4), ITEMS)
    assert sum(result["acc"]) == sum(result["acc_norm"]) == 0


def test_acc_norm_divides_by_ending_bytes() -> None:
    """Sums favour the short ending; per byte the long labelled one wins."""
    item = Item("ctx", ["abcdefghijklmnopqrst", "ab"], 0)  # 20 bytes vs 2 bytes
    result = predictions(lambda _: [(-10.0, 20), (-4.0, 2)], [item])  # -0.5/B vs -2/B
    assert result == {"acc": [False], "acc_norm": [True]}


def test_intervals_and_paired_delta() -> None:
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    base = [True, True, False, False] * 25
    same = paired_delta(base, base)
    assert same == (0.0, 0.0)  # identical answers: no change, no uncertainty
    one_better = base.copy()
    one_better[2] = True
    delta, half = paired_delta(one_better, base)
    assert delta == pytest.approx(1.0) and half == pytest.approx(
        100 * 1.96 * 0.1 / 10, rel=1e-2
    )  # sd(d) = 0.1, n = 100
    row = summarise("p", {"acc": one_better, "acc_norm": base}, {"acc": base, "acc_norm": base})
    assert row["acc_delta_points"] == pytest.approx(1.0) and row["acc_norm_delta_points"] == 0
    text = format_capability([summarise("base", {"acc": base, "acc_norm": base}, None), row], "t")
    assert "+1.0 ±" in text and "50.0%" in text and "100 items" in text


def test_load_items(tmp_path: Path) -> None:
    path = tmp_path / "hs.jsonl"
    rows = [{"context": i.context, "endings": i.endings, "label": i.label} for i in ITEMS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_items(path) == ITEMS and load_items(path, limit=2) == ITEMS[:2]


def test_model_scorer_sums_the_ending_token_logprobs(tiny_model: Path) -> None:
    """Against a direct computation: one forward pass over context + ending."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    item = ITEMS[0]
    scores = model_scorer(model, tokenizer)(item)
    context = tokenizer(item.context, add_special_tokens=False)["input_ids"]
    for (ll, n_bytes), ending in zip(scores, item.endings, strict=True):
        ids = tokenizer(" " + ending, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([context + ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, -1)
        expected = sum(float(logprobs[len(context) - 1 + t, tok]) for t, tok in enumerate(ids))
        assert ll == pytest.approx(expected, abs=1e-4) and n_bytes == len(ending.encode())
        assert math.isfinite(ll) and ll < 0


def test_evaluate_capability_base_and_a_zero_patch(tiny_model: Path, tmp_path: Path) -> None:
    """A zero LoRA (B = 0) is the base model: same answers, change exactly 0 points."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.factory.evaluate import EvalConfig

    zero = tmp_path / "zero"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(
        zero
    )
    configs = [EvalConfig("base", None), EvalConfig("zero", zero)]
    rows = evaluate_capability(tiny_model, configs, ITEMS)
    assert [r["config"] for r in rows] == ["base", "zero"]
    assert rows[1]["acc"] == rows[0]["acc"] and rows[1]["acc_delta_points"] == 0.0
    assert rows[1]["mode"] == "always"
    with pytest.raises(ValueError):  # gated needs each configuration's gate
        evaluate_capability(tiny_model, configs, ITEMS, modes=("gated",))


class _Gate:
    def __init__(self, probe_tokens: int, fire: bool) -> None:
        self.probe_tokens, self.fire, self.seen = probe_tokens, fire, []

    def fires(self, text: str) -> bool:
        self.seen.append(text)
        return self.fire


def test_gated_capability_is_the_base_where_the_gate_passes(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A patch that changes answers scores the base's exact results where its gate does not
    fire, and its own (always-on) results where it fires; the probe is its greedy opening."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.factory.evaluate import EvalConfig

    noisy = tmp_path / "noisy"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(0)
    lora = LoraConfig(
        r=2, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, lora).save_pretrained(noisy)
    configs = [EvalConfig("base", None), EvalConfig("noisy", noisy)]
    passing, firing = _Gate(3, False), _Gate(3, True)
    rows = evaluate_capability(
        tiny_model, configs, ITEMS, modes=("gated", "always"), gates={"noisy": passing}
    )
    base, gated, always = rows
    assert (gated["mode"], always["mode"], gated["fire_rate"]) == ("gated", "always", 0.0)
    assert gated["acc"] == base["acc"] and gated["acc_delta_points"] == 0.0
    assert len(passing.seen) == len(ITEMS) and all(isinstance(t, str) for t in passing.seen)
    fired = evaluate_capability(
        tiny_model, configs, ITEMS, modes=("gated", "always"), gates={"noisy": firing}
    )
    assert fired[1]["fire_rate"] == 1.0
    assert (fired[1]["acc"], fired[1]["acc_norm"]) == (always["acc"], always["acc_norm"])


def test_merge_fired_takes_the_patched_result_only_where_the_gate_fires() -> None:
    from app.factory.capability import merge_fired

    base = {"acc": [True, True, False, False], "acc_norm": [True, False, True, False]}
    fired_only = {"acc": [False, True], "acc_norm": [False, True]}  # items 1 and 3, in order
    merged = merge_fired(base, fired_only, [False, True, False, True])
    assert merged == {"acc": [True, False, False, True], "acc_norm": [True, False, True, True]}
