"""`safepatch train`: fit a LoRA safety patch by refusal-SFT and write it into the patch store."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.config import Settings


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


def train(
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
    mode: Annotated[str, typer.Option(help="safety-only | preserving")] = "preserving",
    preserve: Annotated[
        list[str] | None,
        typer.Option(
            "--preserve",
            help="Prompts whose base-model outputs the patch must keep (preserving "
            "mode): benign instructions, other categories' requests. Same syntax as --prompts.",
        ),
    ] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scaling = alpha / rank).")] = 16.0,
    target_modules: Annotated[
        str, typer.Option(help="Comma-separated module names.")
    ] = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    layers: Annotated[str | None, typer.Option(help="Layers to patch, e.g. 20-29 (all).")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate (AdamW).")] = 2e-4,
    epochs: Annotated[float, typer.Option(help="Epochs over the refusal prompts.")] = 1.0,
    steps: Annotated[int | None, typer.Option(help="Steps (overrides --epochs).")] = None,
    batch_size: Annotated[int, typer.Option(help="Refusal examples per step.")] = 8,
    preserve_batch_size: Annotated[int, typer.Option(help="Preserve examples per step.")] = 8,
    preserve_weight: Annotated[float, typer.Option(help="Weight of the KL term.")] = 1.0,
    margin_weight: Annotated[
        float,
        typer.Option(
            help="Preserving mode: weight of the margin hinge that keeps each base greedy "
            "token the patched model's argmax (0: off). See app/factory/preserve.py."
        ),
    ] = 0.0,
    preserve_tokens: Annotated[int, typer.Option(help="Base response tokens to keep.")] = 32,
    selective_dims: Annotated[
        int,
        typer.Option(
            help="Preserving mode: keep each LoRA's input (A) in the N directions where harmful "
            "prompts have the most energy relative to benign ones (0: off). See "
            "app/factory/selective.py."
        ),
    ] = 0,
    selective_tail: Annotated[
        int,
        typer.Option(
            help="With --selective-dims: measure harmful inputs on each request's last N "
            "tokens (end of the request and the assistant header, where refusal is decided); "
            "0: all its tokens."
        ),
    ] = 0,
    selective_against: Annotated[
        list[str] | None,
        typer.Option(
            "--selective-against",
            help="With --selective-dims: requests the patch must leave alone (e.g. other "
            "categories' harmful ones; also pass them to --preserve). Their last "
            "--selective-tail tokens count as one benign group of their own, so the chosen "
            "inputs stay quiet on them however few they are. Same syntax as --prompts.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed (templates, shuffles, init).")] = 0,
    refusal_category: Annotated[
        str | None, typer.Option(help="Use this category's refusal reasons (e.g. cyber).")
    ] = None,
    refusal_tokens: Annotated[
        int,
        typer.Option(
            help="Train only each refusal's first N tokens; the model's own continuation "
            "finishes it (0: the whole refusal)."
        ),
    ] = 0,
    description: Annotated[str, typer.Option(help="Patch description.")] = "",
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
    from app.factory.data import parse_source
    from app.factory.train import TrainConfig, train_patch
    from app.model.default_model import resolve_model_dir
    from app.patches.validation import validate_name

    settings = Settings()
    validate_name(name)
    if mode not in ("safety-only", "preserving"):
        raise typer.BadParameter("--mode must be safety-only or preserving")
    model_dir = resolve_model_dir(settings, model)
    config = TrainConfig(
        model_dir=Path(model_dir),
        out_dir=out_dir or settings.adapters_dir / name,
        name=name,
        harmful=[parse_source(s, column=column, split="train") for s in prompts],
        preserve=[parse_source(s, split="train") for s in preserve or []],
        mode=mode,  # type: ignore[arg-type]
        rank=rank,
        alpha=alpha,
        target_modules=[m.strip() for m in target_modules.split(",") if m.strip()],
        layers=_layers(layers),
        lr=lr,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        preserve_batch_size=preserve_batch_size,
        preserve_weight=preserve_weight,
        margin_weight=margin_weight,
        preserve_tokens=preserve_tokens,
        selective_dims=selective_dims,
        selective_tail=selective_tail,
        selective_against=[parse_source(s, split="train") for s in selective_against or []],
        seed=seed,
        refusal_category=refusal_category,
        refusal_tokens=refusal_tokens,
        description=description,
        categories=[c for c in categories.split(",") if c],
        command=_command(),
        cache_dir=settings.cache_dir,
        threads=threads,
    )
    result = train_patch(config)
    typer.echo(
        f"wrote {result.out_dir} ({result.steps} steps, {result.seconds:.0f} s); "
        f"refusal loss {result.initial_loss:.3f} -> {result.final_loss:.3f}"
    )


if __name__ == "__main__":
    typer.run(train)
