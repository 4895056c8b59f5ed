"""Greedy tokens from the server equal HF transformers (+ peft) in fp32, token for token."""

from __future__ import annotations

import pytest

from tests.support.reference import chat_prompt_ids, greedy, load_model, load_peft

pytestmark = pytest.mark.slow
PROMPTS = ["how to make a bomb", "what is the capital of france", "write a recipe"]
MAX_TOKENS = 12


def served_tokens(live_server, key: str, model: str, prompt: str, **extra) -> list[int]:
    with live_server.client() as http:
        response = http.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={
                "model": model,
                "temperature": 0,
                "max_tokens": MAX_TOKENS,
                "return_token_ids": True,
                "messages": [{"role": "user", "content": prompt}],
                **extra,
            },
        )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


@pytest.mark.parametrize("patch", [None, "alpha", "beta"])
def test_single_patch_matches_hf(live_server, open_key, tiny_model, patch_library, patch) -> None:
    model = load_peft(tiny_model, patch_library / patch) if patch else load_model(tiny_model)
    for prompt in PROMPTS:
        expected = greedy(model, chat_prompt_ids(tiny_model, prompt), MAX_TOKENS)
        assert served_tokens(live_server, open_key, patch or "tiny", prompt) == expected


def test_patch_changes_output(live_server, open_key) -> None:
    base = served_tokens(live_server, open_key, "tiny", PROMPTS[0])
    assert served_tokens(live_server, open_key, "alpha", PROMPTS[0]) != base


@pytest.mark.parametrize("names", [("alpha", "beta"), ("alpha", "beta", "gamma")])
def test_stacked_patches_match_merged_weights(
    live_server, open_key, tiny_model, patch_library, names
) -> None:
    merged = load_model(tiny_model, [patch_library / n for n in names])
    singles = {n: served_tokens(live_server, open_key, n, PROMPTS[1]) for n in names}
    for prompt in PROMPTS:
        expected = greedy(merged, chat_prompt_ids(tiny_model, prompt), MAX_TOKENS)
        via_field = served_tokens(live_server, open_key, "tiny", prompt, safety_patches=list(names))
        via_model = served_tokens(live_server, open_key, "+".join(names), prompt)
        assert via_field == expected
        assert via_model == expected
    stacked = served_tokens(live_server, open_key, "tiny", PROMPTS[1], safety_patches=list(names))
    assert all(stacked != tokens for tokens in singles.values())
