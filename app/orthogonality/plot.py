"""PNG of an adapter's orthogonality score per layer and per module, against the random
baseline. Matplotlib's Agg backend (no display); the score axis is a logit scale, because
scores and baselines crowd near 1 (e.g. 0.996 vs 0.9996) where a linear axis hides them."""

from __future__ import annotations

import math
from pathlib import Path

from app.orthogonality.results import AdapterScore, Side

_CLIP = 1e-6


def _clip(x: float | None) -> float:
    if x is None or not math.isfinite(x):
        return math.nan
    return min(max(x, _CLIP), 1 - _CLIP)


def plot_adapter_score(score: AdapterScore, out_png: Path, *, side: Side = "both") -> Path:
    """Write a two-panel PNG to `out_png` and return its path: (top) per-layer orthogonality
    1 − φ (‖ΔW‖²_F-weighted) with its baseline; (bottom) every module's score by layer, one
    series per module kind, dashed lines its random-subspace baseline."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10, 7.5), layout="constrained")
    ax_layer, ax_mod = fig.subplots(2, 1, sharex=True)

    layers = [row for row in score.layers(side) if row["layer"] is not None]
    xs = [row["layer"] for row in layers]
    lines = [  # (column, style, colour, label)
        (
            "orthogonality",
            "o-",
            "C0",
            "adapter, right side V (ΔW-energy weighted)"
            if side == "both"
            else "adapter (ΔW-energy weighted)",
        ),
        # the left side (U) beside the paper's right-side headline
        *([("left_orthogonality", "s:", "C1", "adapter, left side U")] if side == "both" else []),
        ("baseline", "--", "grey", "random subspace baseline"),
    ]
    for column, style, color, label in lines:
        ax_layer.plot(xs, [_clip(row[column]) for row in layers], style, color=color, label=label)
    ax_layer.set_ylabel("orthogonality 1 − φ")
    summary = score.to_dict(detail=False, side=side)
    overall = summary["orthogonality"]
    left = summary.get("left_orthogonality")
    ax_layer.set_title(
        f"{score.adapter}: orthogonality "
        f"{'n/a' if overall is None else f'{overall:.4f}'} "
        f"(baseline {summary['baseline'] or float('nan'):.4f}, "
        + (f"right side V; left side U {left:.4f})" if left is not None else f"side={side})")
    )

    kinds = sorted({m.kind for m in score.modules})
    for i, kind in enumerate(kinds):
        mods = sorted(
            (m for m in score.modules if m.kind == kind and m.layer is not None),
            key=lambda m: m.layer or 0,
        )
        if not mods:
            continue
        layers = [m.layer for m in mods]
        color = f"C{i % 10}"
        measured, baseline = zip(*(m.phi(side) for m in mods), strict=True)
        ax_mod.plot(
            layers, [_clip(1 - p) for p in measured], "o-", color=color, ms=3, lw=1, label=kind
        )
        ax_mod.plot(layers, [_clip(1 - p) for p in baseline], "--", color=color, lw=0.8, alpha=0.7)
    ax_mod.set_ylabel("orthogonality 1 − φ per module")
    ax_mod.set_xlabel("layer")
    for ax in (ax_layer, ax_mod):
        ax.set_yscale("logit")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.6g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
    ax_layer.legend(loc="best", fontsize="small")
    if kinds:
        ax_mod.legend(
            loc="best",
            fontsize="small",
            ncol=min(len(kinds), 7),
            title="module (dashed: baseline)",
            title_fontsize="small",
        )
    fig.savefig(out_png, dpi=100)
    return out_png
