"""Experiment: harm-selective LoRA inputs that also stay quiet on given requests (was
`safepatch train --selective-against SPEC`, session 4's cyber variant `c8`; not shipped).

The harm-selective inputs (`app.factory.selective`, `--selective-dims`) are chosen against the
second moments of benign tokens. A category patch must also leave other categories' harmful
requests alone, but those are a small share of its preserve prompts, and their last tokens a
smaller share still of C_b. This recipe adds them as one benign group of their own (their last
`--selective-tail` tokens), weighted like the rest however few they are. It moved neither the
cyber nor the other-category refusal rate by more than the ±7-point noise of 45 prompts: see
docs/patch-results.md, "Category selectivity of `cyber`" (row `c8`).

    python -m bench.experiments.selective_against \\
        --against "advbench_harmful_behaviors.csv?exclude=cyber" \\
        --against "harmful_train.json?exclude=cyber" -- --name cyber-c8 --selective-dims 4 ...
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace

from app.cli.train import config_from_args, report
from app.factory.data import file_sha256, load_prompts, parse_source
from app.factory.preserve import chat_prompt_ids
from app.factory.selective import constrain_lora_inputs, selective_moments, tails
from app.factory.train import Setup, TrainResult, finish, fit, prepare, selective_lora_inputs
from bench.experiments import split_argv


def moments_with_against(setup: Setup, tail: int, against: Sequence[Sequence[int]]):
    """C_h from the refusal prompts' last `tail` tokens; C_b from the preserve answers (every
    position), the preserve prompts' last `tail` tokens, and the `against` prompts' last
    `tail` tokens as a group of their own. Not cached (an experiment)."""
    backbone = setup.model.get_base_model().model
    names = [n for n, m in backbone.named_modules() if hasattr(m, "lora_A")]
    harmful = [p for p, _ in setup.examples]
    sequences = [list(t.prompt_ids) + list(t.response_ids) for t in setup.targets]
    prompts = [t.prompt_ids for t in setup.targets]
    benign = [(sequences, [(0, len(s)) for s in sequences]), (against, tails(against, tail))]
    if tail:
        benign.insert(1, (prompts, tails(prompts, tail)))
    return selective_moments(
        backbone, names, [(harmful, tails(harmful, tail))], benign, setup.pad_id
    )


def train(config, against: list[str]) -> TrainResult:  # config: app.factory.config.TrainConfig
    if not config.selective_dims:
        raise ValueError("the against-group needs --selective-dims")
    sources = [parse_source(spec, split="train") for spec in against]
    setup = prepare(replace(config, selective_dims=0))  # constrained below, with the group
    ids = [chat_prompt_ids(setup.tokenizer, p) for s in sources for p in load_prompts(s)]
    moments = moments_with_against(setup, config.selective_tail, ids)
    setup.lora_inputs = selective_lora_inputs(config, setup, moments)
    constrain_lora_inputs(setup.lora_inputs, config.seed)
    recipe = {
        "recipe": "bench/experiments/selective_against.py",
        "selective_against_sources": [s.spec() for s in sources],
        "selective_against_sha256": {str(s.path): file_sha256(s.path) for s in sources},
    }
    return finish(config, setup, fit(config, setup), **recipe)


def main(argv: Sequence[str] | None = None) -> None:
    ours, theirs, command = split_argv(argv, __spec__.name if __spec__ else __name__)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", action="append", required=True, metavar="SPEC")
    options = parser.parse_args(ours)
    report(train(config_from_args(theirs, command), options.against))


if __name__ == "__main__":
    main()
