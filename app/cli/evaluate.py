"""`safepatch eval`: refusal, over-refusal and preservation of patches through the real engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from app.config import Settings
from app.patches.gate import MODES, Mode


def evaluate(
    prompts: Annotated[
        list[str] | None,
        typer.Option(
            "--prompts",
            help="Prompt file(s): CSV/JSON/JSONL, optionally PATH?column=..&kind=.."
            "&where=COL:VAL&match=..&exclude=..&limit=N&name=.. (see app/factory/data.py).",
        ),
    ] = None,
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
    column: Annotated[
        list[str] | None,
        typer.Option(
            "--column",
            help="Prompt column: once for all --prompts, or once per --prompts in the same "
            "order (default: auto).",
        ),
    ] = None,
    kind: Annotated[
        list[str] | None,
        typer.Option(
            "--kind",
            help="harmful | benign: once for all --prompts, or once per --prompts in the same "
            "order; a spec's kind= wins.",
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="dev, train or all for every set. Default: dev for files a patch was trained "
            "on (shipped or evaluated), the whole file otherwise."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most N prompts per file.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Greedy tokens per response.")] = 32,
    capability: Annotated[
        Path | None,
        typer.Option(
            help="Multiple-choice capability set scored by log-likelihood (HellaSwag JSONL: "
            "context, endings, label), e.g. hellaswag_val.jsonl (found in SAFEPATCH_DATA_DIR)."
        ),
    ] = None,
    capability_limit: Annotated[
        int | None, typer.Option(help="Score the first N capability items (all: omit).")
    ] = 500,
    judge_name: Annotated[
        str | None,
        typer.Option(
            "--judge",
            help="Refusal judge: opening-v2 (default), keyword-v1, or module:attribute.",
        ),
    ] = None,
    mode: Annotated[
        list[str] | None,
        typer.Option(
            "--mode",
            help="gated | always (always-on: alias), repeatable; default both. Gated numbers "
            "are derived from the same engine pass (app/factory/gating.py).",
        ),
    ] = None,
    calibrate_gate: Annotated[
        bool,
        typer.Option(
            help="Calibrate each patch's gate (probe_tokens) on the sets it never trained on and "
            "store it in its safepatch.json (with --store); a gate block set by hand is kept."
        ),
    ] = True,
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
    from app.factory.calibrate import store_gates, summary
    from app.factory.evaluate import EvalRun, build_configs, stored_patches, temp_work_dir
    from app.factory.evaluate import evaluate as run_evaluation
    from app.factory.judge import default_judge, load_judge
    from app.factory.report import build_report, format_table, plot, store_in_patches, write_json
    from app.factory.scoring import resolve_gates
    from app.factory.sets import build_sets, patch_trainings, store_trainings, trained_files
    from app.model.default_model import resolve_model_dir
    from app.model.identity import model_identity

    settings = Settings()
    if split not in (None, "dev", "train", "all"):
        raise typer.BadParameter("--split must be dev, train or all")
    if not prompts and capability is None:
        raise typer.BadParameter("give --prompts and/or --capability")
    modes = parse_modes(mode)
    try:
        judge = load_judge(judge_name) if judge_name else default_judge()
    except (ValueError, ImportError, AttributeError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    with temp_work_dir() as work:
        try:
            configs = build_configs(patch or [], stack or [], settings.adapters_dir, Path(work))
            evaluated = patch_trainings({d for c in configs for _, d in c.patch_dirs}).values()
            sets = build_sets(
                prompts or [],
                columns=column,
                kinds=kind,
                split=split,  # type: ignore[arg-type]
                limit=limit,
                training_files=trained_files([*store_trainings(settings.adapters_dir), *evaluated]),
            )
        except (ValueError, FileNotFoundError) as exc:
            raise typer.BadParameter(str(exc)) from exc
        model_dir = resolve_model_dir(settings, model)
        run = (
            run_evaluation(
                model_dir,
                configs,
                sets,
                modes=modes,
                calibrate=calibrate_gate,
                max_tokens=max_tokens,
                settings=settings,
                judge=judge,
            )
            if sets
            else EvalRun([], resolve_gates(configs, sets, None, judge, calibrate=False))
        )
        capability_report = (
            _capability(model_dir, configs, capability, capability_limit, modes, run.gates)
            if capability is not None
            else None
        )
    entries = run.entries
    report = build_report(
        entries,
        model=model_identity(model_dir),
        judge=judge.name,
        max_tokens=max_tokens,
        prompt_sets={
            s.name: {"file": s.file, "split": s.split, "in_file": s.available}
            | {"scored": len(s.prompts)}
            for s in sets
        },
    )
    if capability_report is not None:
        report["capability"] = capability_report
    if run.gates.records:
        report["gates"] = {
            name: record | {"stored_block": run.gates.blocks[name] is not None}
            for name, record in run.gates.records.items()
        }
    if entries:
        typer.echo(format_table(report))
    for name, record in run.gates.records.items():
        kept = "" if run.gates.blocks[name] else " (not stored: its gate block was set by hand)"
        typer.echo(f"gate {name}: {summary(record)}{kept}")
    if capability_report is not None:
        from app.factory.capability import format_capability

        typer.echo(format_capability(capability_report["results"], capability_report["file"]))
    if json_out:
        write_json(report, json_out)
        typer.echo(f"wrote {json_out}")
    if plot_out and entries:
        plot(report, plot_out)
        typer.echo(f"wrote {plot_out}")
    if store:
        stored = store_in_patches(report, stored_patches(configs))
        if stored:
            typer.echo("stored results in " + ", ".join(stored))
        gated = store_gates(run.gates.blocks, stored_patches(configs))
        if gated:
            typer.echo("stored calibrated gates in " + ", ".join(gated))


def parse_modes(values: list[str] | None) -> tuple[Mode, ...]:
    """`--mode` values -> modes in the order given, without repeats; none -> both.
    `always-on` is accepted for `always`."""
    if not values:
        return MODES
    aliases = {"always-on": "always"}
    modes = [aliases.get(v.strip().lower(), v.strip().lower()) for v in values]
    unknown = [v for v, m in zip(values, modes, strict=True) if m not in MODES]
    if unknown:
        raise typer.BadParameter(f"--mode must be gated or always (always-on), got {unknown[0]!r}")
    return tuple(dict.fromkeys(modes))  # type: ignore[arg-type]


def _capability(
    model_dir: Path,
    configs: list[Any],
    path: Path,
    limit: int | None,
    modes: tuple[Mode, ...],
    gates: Any,  # app.factory.scoring.Gates
) -> dict[str, Any]:
    """Capability rows for every configuration and mode, with the file and item count."""
    from app.factory.capability import evaluate_capability, load_items
    from app.factory.data import resolve_path

    try:
        items = load_items(resolve_path(path), limit)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc)) from exc
    results = evaluate_capability(model_dir, configs, items, modes=modes, gates=gates.by_config)
    return {"file": path.name, "items": len(items), "modes": list(modes), "results": results}


if __name__ == "__main__":
    typer.run(evaluate)
