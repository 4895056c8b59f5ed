"""`safepatch train`: fit a LoRA safety patch by refusal-SFT and write it into the patch store.

One option per `app.factory.config.TrainConfig` field, same name and default (read from the
config; `tests/factory/test_train_config.py` checks the two agree). Options that take another
form on the command line: `--prompts` (-> `harmful`, with `--column`), `--model`
(-> `model_dir`), comma-separated `--target-modules`/`--categories`, `--layers` ranges.
Experiments that need more than this CLI are recipes in bench/experiments/.
"""

from __future__ import annotations

import functools
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from app.config import Settings
from app.factory.config import TrainConfig, config_fields

# CLI name -> TrainConfig field, where they differ
RENAMED = {"prompts": "harmful", "model": "model_dir"}
CLI_ONLY = {"column"}  # folded into the prompt sources
NOT_ON_CLI = {"command", "cache_dir"}  # set from the invocation and the settings


def _default(name: str) -> Any:
    field = config_fields()[name]
    factory = field.default_factory
    return factory() if callable(factory) else field.default


def _layers(value: str | None) -> list[int] | None:
    """'20-29' or '3,5,7' or '20-24,28' -> sorted layer indices; None/'' -> all layers."""
    if not value:
        return None
    layers: set[int] = set()
    for part in value.split(","):
        lo, _, hi = part.strip().partition("-")
        layers.update(range(int(lo), int(hi or lo) + 1))
    return sorted(layers)


def _command() -> str:
    args = sys.argv[1:]
    if "train" in args:
        args = args[args.index("train") + 1 :]
    return "safepatch train " + shlex.join(args)


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def build_config(
    prompts: Annotated[
        list[str],
        typer.Option(
            "--prompts",
            help="Harmful prompt file(s) to refuse: CSV/JSON/JSONL, optionally "
            "PATH?column=..&match=..&exclude=..&where=COL:VAL&limit=N (see app/factory/data.py). "
            "Only the train split is used.",
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="Patch name (directory in adapters_dir).")],
    column: Annotated[str | None, typer.Option(help="Prompt column for all files.")] = None,
    mode: Annotated[str, typer.Option(help="safety-only | preserving")] = _default("mode"),
    preserve: Annotated[
        list[str] | None,
        typer.Option(
            "--preserve",
            help="Prompts whose base-model outputs the patch must keep (preserving "
            "mode): benign instructions, other categories' requests. Same syntax as --prompts.",
        ),
    ] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = _default("rank"),
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scaling = alpha / rank).")] = _default(
        "alpha"
    ),
    target_modules: Annotated[str, typer.Option(help="Comma-separated module names.")] = ",".join(
        _default("target_modules")
    ),
    layers: Annotated[str | None, typer.Option(help="Layers to patch, e.g. 20-29 (all).")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate (AdamW).")] = _default("lr"),
    epochs: Annotated[float, typer.Option(help="Epochs over the refusal prompts.")] = _default(
        "epochs"
    ),
    steps: Annotated[int | None, typer.Option(help="Steps (overrides --epochs).")] = None,
    batch_size: Annotated[int, typer.Option(help="Refusal examples per step.")] = _default(
        "batch_size"
    ),
    preserve_batch_size: Annotated[
        int, typer.Option(help="Preserve examples per step.")
    ] = _default("preserve_batch_size"),
    preserve_weight: Annotated[float, typer.Option(help="Weight of the KL term.")] = _default(
        "preserve_weight"
    ),
    margin_weight: Annotated[
        float,
        typer.Option(
            help="Preserving mode: weight of the margin hinge that keeps each base greedy "
            "token the patched model's argmax (0: off). See app/factory/preserve.py."
        ),
    ] = _default("margin_weight"),
    preserve_tokens: Annotated[int, typer.Option(help="Base response tokens to keep.")] = _default(
        "preserve_tokens"
    ),
    kl_top_k: Annotated[
        int, typer.Option(help="Base tokens per position in the training KL (top-k).")
    ] = _default("kl_top_k"),
    decision_tokens: Annotated[
        int,
        typer.Option(
            help="The first N response positions, where refusal is decided, weigh "
            "--decision-weight in every loss (0: uniform). See app/factory/losses.py."
        ),
    ] = _default("decision_tokens"),
    decision_weight: Annotated[
        float, typer.Option(help="Weight of the first --decision-tokens positions.")
    ] = _default("decision_weight"),
    selective_dims: Annotated[
        int,
        typer.Option(
            help="Preserving mode: keep each LoRA's input (A) in the N directions where harmful "
            "prompts have the most energy relative to benign ones (0: off). See "
            "app/factory/selective.py."
        ),
    ] = _default("selective_dims"),
    selective_tail: Annotated[
        int,
        typer.Option(
            help="With --selective-dims: measure harmful inputs on each request's last N "
            "tokens (end of the request and the assistant header, where refusal is decided); "
            "0: all its tokens."
        ),
    ] = _default("selective_tail"),
    seed: Annotated[int, typer.Option(help="Seed (templates, shuffles, init).")] = _default("seed"),
    refusal_category: Annotated[
        str | None, typer.Option(help="Use this category's refusal reasons (e.g. cyber).")
    ] = None,
    calibrate_gate: Annotated[
        bool,
        typer.Option(
            help="At the end, calibrate the patch's gate (probe_tokens) on the dev split of the "
            "training sources and store it (gate block, mode gated). See app/factory/calibrate.py."
        ),
    ] = _default("calibrate_gate"),
    description: Annotated[str, typer.Option(help="Patch description.")] = _default("description"),
    categories: Annotated[str, typer.Option(help="Comma-separated categories.")] = "",
    model: Annotated[
        Path | None,
        typer.Option(help="Base model directory (default: the embedded SmolLM2-135M-Instruct)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Torch CPU threads (1 is fastest on a busy shared CPU).")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option(help="Write here instead of <adapters_dir>/<name>.")
    ] = None,
) -> None:
    """Train a LoRA safety patch (refusal-SFT) and write it with its metadata."""
    options = {k: v for k, v in locals().items() if k in config_fields()}  # same-named fields
    from app.factory.data import parse_source
    from app.model.default_model import resolve_model_dir
    from app.patches.validation import validate_name

    settings = Settings()
    validate_name(name)
    if mode not in ("safety-only", "preserving"):
        raise typer.BadParameter("--mode must be safety-only or preserving")
    return TrainConfig(
        **options
        | {
            "model_dir": Path(resolve_model_dir(settings, model)),
            "out_dir": out_dir or settings.adapters_dir / name,
            "harmful": [parse_source(s, column=column, split="train") for s in prompts],
            "preserve": [parse_source(s, split="train") for s in preserve or []],
            "target_modules": _csv(target_modules),
            "layers": _layers(layers),
            "categories": _csv(categories),
            "command": _command(),
            "cache_dir": settings.cache_dir,
        }
    )


@functools.wraps(build_config)  # the same options (typer reads the wrapped signature)
def train(*args: Any, **kwargs: Any) -> None:
    from app.factory.train import train_patch

    report(train_patch(build_config(*args, **kwargs)))


def report(result: Any) -> None:  # app.factory.train.TrainResult
    typer.echo(
        f"wrote {result.out_dir} ({result.steps} steps, {result.seconds:.0f} s); "
        f"refusal loss {result.initial_loss:.3f} -> {result.final_loss:.3f}"
    )


def config_from_args(args: list[str], command: str) -> TrainConfig:
    """`safepatch train` options -> TrainConfig, without training: for recipes
    (bench/experiments/) that add a step of their own; `command` is what reproduces the run."""
    app = typer.Typer(add_completion=False)
    app.command()(build_config)
    config = typer.main.get_command(app).main(args, standalone_mode=False)
    return replace(config, command=command)


if __name__ == "__main__":
    typer.run(train)
