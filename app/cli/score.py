"""`safepatch score <adapter-dir>`: orthogonality of a LoRA patch to the base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _table(summary: dict[str, Any]) -> str:
    lines = [
        f"adapter {summary['adapter']}  model {summary['model']['name']} "
        f"({summary['model']['architecture']}, {summary['model']['fingerprint']})",
        f"ranks {summary['ranks']}  k {summary['k'] or 'r (adapter rank)'}  "
        f"modules {summary['n_modules']}  skipped {len(summary['skipped'])}",
        f"orthogonality {_f(summary['orthogonality'])}  (right side, the paper's "
        f"Sim = V_d^T V_0; random baseline {_f(summary['baseline'])})",
        f"left orthogonality {_f(summary['left_orthogonality'])}  (left side U; random "
        f"baseline {_f(summary['left_baseline'])})",
        f"phi {_f(summary['phi'], 5)}  baseline {_f(summary['phi_baseline'], 5)}  "
        f"phi/baseline {_f(summary['phi_ratio'], 2)}",
    ]
    worst = summary["worst_module"]
    if worst:
        lines.append(
            f"worst module {worst['module']}  orthogonality "
            f"{_f(worst['orthogonality'])} (baseline {_f(worst['baseline'])})"
        )
    header = (
        f"{'module':<44} {'r':>3} {'k':>3} {'phi_R':>8} {'base_R':>8} {'phi_L':>8} "
        f"{'base_L':>8} {'energy_R':>8} {'orth':>7} {'share':>6}"
    )
    lines += ["", header, "-" * len(header)]
    for row in summary["modules"]:
        right, left = row["right"], row["left"]
        lines.append(
            f"{row['module'][-44:]:<44} {row['r']:>3} {row['k']:>3} {_f(right['phi'], 5):>8} "
            f"{_f(right['phi_baseline'], 5):>8} {_f(left['phi'], 5):>8} "
            f"{_f(left['phi_baseline'], 5):>8} {_f(right['energy_fraction'], 5):>8} "
            f"{_f(row['orthogonality']):>7} {_f(row['energy_share'], 3):>6}"
        )
    for skip in summary["skipped"]:
        lines.append(f"skipped {skip['module']}: {skip['reason']}")
    return "\n".join(lines)


def score(
    adapter_dir: Path = typer.Argument(..., help="PEFT LoRA adapter directory"),
    model: Optional[str] = typer.Option(  # noqa: UP045 - typer needs Optional on 3.10
        None, "--model", help="HF safetensors model dir (default: the embedded SmolLM2)"
    ),
    k: Optional[int] = typer.Option(  # noqa: UP045
        None, "--k", help="subspace dimension k (default: the adapter's rank)"
    ),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Score how orthogonal a LoRA patch's update is to the base model's top-k singular
    subspaces (1 = orthogonal; compare with the random-subspace baseline)."""
    from app.config import Settings
    from app.model.default_model import resolve_model_dir
    from app.orthogonality.scoring import score_adapter

    settings = Settings()
    model_dir = resolve_model_dir(settings, model)
    try:
        result = score_adapter(Path(adapter_dir), model_dir, k=k, cache_dir=settings.cache_dir)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    summary = result.to_dict(detail=True, side="both")
    if json_out:
        keys = (
            "adapter",
            "model",
            "k",
            "ranks",
            "orthogonality",
            "phi",
            "baseline",
            "phi_baseline",
            "phi_ratio",
            "left_orthogonality",
            "left_phi",
            "left_baseline",
            "left_phi_baseline",
            "worst_module",
            "right",
            "left",
            "skipped",
        )
        typer.echo(
            json.dumps(
                {**{key: summary[key] for key in keys}, "modules": summary["modules"]}, indent=2
            )
        )
    else:
        typer.echo(_table(summary))


if __name__ == "__main__":
    typer.run(score)
