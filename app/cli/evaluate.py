"""`safepatch eval`: refusal, over-refusal and preservation of patches through the real engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.config import Settings


def evaluate(
    prompts: Annotated[
        list[str],
        typer.Option(
            "--prompts",
            help="Prompt file(s): CSV/JSON/JSONL, optionally PATH?column=..&kind=.."
            "&where=COL:VAL&match=..&exclude=..&limit=N&name=.. (see app/factory/data.py).",
        ),
    ],
    patch: Annotated[
        list[str] | None,
        typer.Option("--patch", help="Patch name in adapters_dir (or a path); repeatable."),
    ] = None,
    stack: Annotated[
        list[str] | None,
        typer.Option(
            "--stack", help="Stacked patches 'a+b' evaluated as one combined adapter; repeatable."
        ),
    ] = None,
    column: Annotated[str | None, typer.Option(help="Prompt column (default: auto).")] = None,
    kind: Annotated[
        str | None, typer.Option(help="harmful | benign, for prompt files whose spec has no kind=.")
    ] = None,
    split: Annotated[
        str, typer.Option(help="dev (held out from training, default), train or all.")
    ] = "dev",
    limit: Annotated[int | None, typer.Option(help="At most N prompts per file.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Greedy tokens per response.")] = 32,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the JSON report.")] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", help="Write a PNG chart.")] = None,
    model: Annotated[
        Path | None,
        typer.Option(help="Base model directory (default: the embedded SmolLM2-135M-Instruct)."),
    ] = None,
    store: Annotated[
        bool, typer.Option(help="Store each patch's results in its safepatch.json (evaluation).")
    ] = True,
) -> None:
    """Evaluate the base model, each --patch and each --stack on each --prompts set."""
    from app.factory.data import load_prompts, parse_source
    from app.factory.evaluate import PromptSet, build_configs, stored_patches, temp_work_dir
    from app.factory.evaluate import evaluate as run_evaluation
    from app.factory.judge import KeywordJudge
    from app.factory.report import build_report, format_table, plot, store_in_patches, write_json
    from app.model.default_model import ensure_default_model
    from app.model.identity import model_identity

    settings = Settings()
    if split not in ("dev", "train", "all"):
        raise typer.BadParameter("--split must be dev, train or all")
    if kind not in (None, "harmful", "benign"):
        raise typer.BadParameter("--kind must be harmful or benign")
    sets = []
    for spec in prompts:
        source = parse_source(
            spec,
            column=column,
            split=split,
            kind=kind,  # type: ignore[arg-type]
            limit=limit,
        )
        if source.kind is None:
            raise typer.BadParameter(f"{spec}: say --kind harmful|benign (or kind= in the spec)")
        sets.append(PromptSet(source.label, source.kind, load_prompts(source)))
        if not sets[-1].prompts:
            raise typer.BadParameter(f"{spec}: no prompts after filtering ({split} split)")
    if len({s.name for s in sets}) != len(sets):
        raise typer.BadParameter("prompt sets need distinct names (use name= in the spec)")
    model_dir = Path(model) if model else ensure_default_model(settings.cache_dir)
    judge = KeywordJudge()
    with temp_work_dir() as work:
        configs = build_configs(patch or [], stack or [], settings.adapters_dir, Path(work))
        entries = run_evaluation(
            model_dir, configs, sets, max_tokens=max_tokens, settings=settings, judge=judge
        )
    report = build_report(
        entries,
        model=model_identity(model_dir),
        judge=judge.name,
        max_tokens=max_tokens,
        split=split,
        prompt_sets={s.name: len(s.prompts) for s in sets},
    )
    typer.echo(format_table(report))
    if json_out:
        write_json(report, json_out)
        typer.echo(f"wrote {json_out}")
    if plot_out:
        plot(report, plot_out)
        typer.echo(f"wrote {plot_out}")
    if store:
        stored = store_in_patches(report, stored_patches(configs))
        if stored:
            typer.echo("stored results in " + ", ".join(stored))


if __name__ == "__main__":
    typer.run(evaluate)
