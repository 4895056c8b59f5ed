"""Experiment recipes in bench/experiments/: they take `safepatch train`'s options plus their
own, and change one step of the library's training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.factory.selective import MomentCollector, cached_moments
from bench.experiments import split_argv
from tests.factory.conftest import HARMFUL


def test_split_argv_separates_the_recipe_options_from_the_train_options() -> None:
    ours, theirs, command = split_argv(["--refusal-tokens", "6", "--", "--name", "x"], "m.r")
    assert (ours, theirs) == (["--refusal-tokens", "6"], ["--name", "x"])
    assert command == "python -m m.r --refusal-tokens 6 -- --name x"


def test_refusal_tokens_cut_each_refusal(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from app.factory.losses import refusal_examples
    from bench.experiments.refusal_tokens import cut_refusals

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    whole = refusal_examples(tokenizer, HARMFUL[:4], seed=0, category=None)
    cut = cut_refusals(whole, 3)
    assert all(r[-1] == tokenizer.eos_token_id and len(r) > 3 for _, r in whole)
    assert [(p, r[:3]) for p, r in whole] == cut
    with pytest.raises(ValueError):
        cut_refusals(whole, 0)


def test_against_requests_add_their_tails_as_one_benign_group(tiny_model: Path) -> None:
    """C_b with the against-group = the library's C_b + the mean moment of the against
    prompts' last `tail` tokens; C_h is the library's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.factory.preserve import GreedyTarget
    from app.factory.train import Setup
    from bench.experiments.selective_against import moments_with_against

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["down_proj"], layers_to_transform=[1])
    )
    empty = torch.zeros(0)
    setup = Setup(
        model, None, 0, [([5, 6, 7, 8], [1])], [GreedyTarget([9, 10, 11], [12, 13], empty, empty)]
    )
    backbone = model.get_base_model().model
    names = [n for n, m in backbone.named_modules() if hasattr(m, "lora_A")]
    against = [[20, 21, 22, 23], [24, 25, 26]]
    plain = cached_moments(
        backbone,
        names,
        harmful=[[5, 6, 7, 8]],
        benign=[([9, 10, 11], [12, 13])],
        tail=2,
        pad_id=0,
        cache_root=None,
        cache_salt="",
    )
    with_against = moments_with_against(setup, 2, against)
    collector = MomentCollector(backbone, names)
    collector.run(backbone, against, [(2, 4), (1, 3)], pad_id=0)  # the last 2 tokens
    group = collector.moments()[names[0]]
    scale = float(group.abs().max())
    added = with_against["benign"][names[0]] - plain["benign"][names[0]]
    assert torch.allclose(added, group, rtol=0, atol=1e-5 * scale)
    assert torch.equal(with_against["harmful"][names[0]], plain["harmful"][names[0]])


@pytest.mark.slow
def test_selective_against_recipe_trains_and_records_its_group(
    tiny_model: Path, prompt_files: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors import safe_open

    from app.cli.train import config_from_args
    from app.patches.metadata import PatchMetadata
    from bench.experiments.selective_against import main

    against = f"{prompt_files['benign']}?split=all&limit=3"
    train_args = [
        "--name", "sel", "--model", str(tiny_model), "--out-dir", str(tmp_path / "sel"),
        "--prompts", f"{prompt_files['harmful']}?split=all", "--column", "request",
        "--preserve", f"{prompt_files['benign']}?split=all", "--rank", "4", "--alpha", "8",
        "--lr", "1e-2", "--steps", "3", "--batch-size", "4", "--preserve-batch-size", "4",
        "--preserve-tokens", "6", "--kl-top-k", "8", "--selective-dims", "2", "--threads", "1",
        "--no-calibrate-gate",
    ]  # fmt: skip
    main(["--against", against, "--", *train_args])
    training = PatchMetadata.read(tmp_path / "sel").training or {}
    assert training["recipe"] == "bench/experiments/selective_against.py"
    (recorded,) = training["selective_against_sources"]
    assert recorded.startswith(str(prompt_files["benign"])) and "limit=3" in recorded
    assert training["command"].startswith("python -m bench.experiments.selective_against --against")
    with safe_open(str(tmp_path / "sel" / "adapter_model.safetensors"), framework="pt") as fh:
        names = fh.keys()  # safe_open is not iterable
        a_weights = [fh.get_tensor(k) for k in names if "lora_A" in k]
    for a in a_weights:  # rank ≤ dims = 2
        singular = torch.linalg.svdvals(a.double())
        assert float(singular[2:].max()) < 1e-5 * float(singular[0])
    no_dims = [a for a in train_args if a not in ("--selective-dims", "2")]
    with pytest.raises(ValueError, match="needs --selective-dims"):
        from bench.experiments.selective_against import train

        train(config_from_args(no_dims, "x"), [against])
