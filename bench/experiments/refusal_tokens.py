"""Experiment: train only the first N tokens of each refusal (was `safepatch train
--refusal-tokens N`, session 3; not shipped). The patch learns to *start* a refusal and the
model's own continuation finishes it, so the template's random wording is not memorised; it
raised the harmless exact-match rate but the continuations drift ("I'm sorry, but I can't
help with that request. … However, I can help with making a bomb…"). See
docs/patch-results.md, "+ margin hinge 50, refusal loss on the first 6 tokens only".

    python -m bench.experiments.refusal_tokens --refusal-tokens 6 -- --name rg-rt6 \\
        --prompts advbench_harmful_behaviors.csv ... (any `safepatch train` options)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from app.cli.train import config_from_args, report
from app.factory.train import Example, TrainResult, finish, fit, prepare
from bench.experiments import split_argv


def cut_refusals(examples: Sequence[Example], tokens: int) -> list[Example]:
    """Each (prompt ids, refusal ids + EOS) with the refusal cut to its first `tokens`."""
    if tokens < 1:
        raise ValueError("--refusal-tokens must be at least 1")
    return [(prompt, refusal[:tokens]) for prompt, refusal in examples]


def train(config, tokens: int) -> TrainResult:  # config: app.factory.config.TrainConfig
    setup = prepare(config)
    setup.examples = cut_refusals(setup.examples, tokens)
    losses = fit(config, setup)
    recipe = {"recipe": "bench/experiments/refusal_tokens.py", "refusal_tokens": tokens}
    return finish(config, setup, losses, **recipe)


def main(argv: Sequence[str] | None = None) -> None:
    ours, theirs, command = split_argv(argv, __spec__.name if __spec__ else __name__)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refusal-tokens", type=int, required=True)
    options = parser.parse_args(ours)
    report(train(config_from_args(theirs, command), options.refusal_tokens))


if __name__ == "__main__":
    main()
