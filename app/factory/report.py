"""Evaluation reports: JSON file, PNG chart, printed table, and per-patch storage.

The JSON report is `{"created_at", "model", "judge", "max_tokens", "prompt_sets",
"leave_source_out", "entries": [...]}`; each entry is one configuration × prompt set with
`config`, `prompts`, `kind`, `split` (the part of the file scored), `available` (prompts in the
file after filters), `n` (prompts scored), `refusal_rate`, `source` (patches only: `held-out`,
`dev` or `trained`, see `app.factory.sets`), `categories` (`{category: {"n", "refused"}}` where
the file labels them), and for benign sets `unchanged_rate` and `mean_kl` (plus a few
`examples`); patched configurations have one entry per `mode` (`always`, `gated`: with
`fire_rate` and `probe_tokens`, see `app.factory.scoring`). `leave_source_out` pools, per
configuration and mode, the harmful sets from files its patches never trained on, beside the
base model on the same sets. `gates` holds each patch's calibration run (`app.factory.calibrate`).
`store_in_patches` writes, for every evaluated single patch, the entries of that patch and of
the base model (and of stacks containing it) into the `evaluation` field of its
`safepatch.json`, replacing earlier results for the same configuration and prompt set.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def build_report(entries: Sequence[dict[str, Any]], **info: Any) -> dict[str, Any]:
    return {
        "created_at": datetime.now(timezone.utc).isoformat(),
        **info,
        "leave_source_out": leave_source_out(entries),
        "modes": mode_summary(entries),
        "entries": list(entries),
    }


def mode_summary(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration and mode, pooled over sets (weighted by prompts scored): harmful
    refusal, and on benign sets over-refusal, unchanged rate, mean KL and the gate's fire rate."""
    rows = []
    for config, mode in dict.fromkeys((e["config"], e.get("mode")) for e in entries):
        mine = [e for e in entries if (e["config"], e.get("mode")) == (config, mode)]
        row: dict[str, Any] = {"config": config, **({"mode": mode} if mode else {})}
        for kind, keys in (("harmful", ("refusal_rate",)), ("benign", BENIGN_KEYS)):
            sets = [e for e in mine if e["kind"] == kind]
            n = sum(e["n"] for e in sets)
            for key in keys if n else ():
                if all(e.get(key) is not None for e in sets):
                    row[f"{kind}_{key}"] = sum(e[key] * e["n"] for e in sets) / n
        rows.append(row)
    return rows


BENIGN_KEYS = ("refusal_rate", "unchanged_rate", "mean_kl", "fire_rate")


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:5.1f}%"


def _kl(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(report: dict[str, Any]) -> str:
    """Fixed-width tables: one row per configuration × prompt set, then leave-source-out."""
    rows = [
        ("config", "mode", "prompts", "kind", "split", "scored/in file", "source")
        + ("refusal", "unchanged", "mean KL", "gate fires")
    ]
    for e in report["entries"]:
        kl = e.get("mean_kl")
        rows.append(
            (
                e["config"],
                e.get("mode", "-"),
                e["prompts"],
                e["kind"],
                e.get("split", "-"),
                f"{e['n']}/{e.get('available') or '-'}",
                e.get("source", "-"),
                _pct(e["refusal_rate"]),
                _pct(e.get("unchanged_rate")),
                _kl(kl),
                _pct(e.get("fire_rate")),
            )
        )
    lines = _fixed(rows)
    if report.get("judge"):
        lines.insert(0, f"judge: {report['judge']}")
    lines += ["", "modes (pooled over sets; benign mean KL weighted by prompts):"]
    lines += _fixed(
        [("config", "mode", "harmful refusal", "over-refusal", "unchanged", "mean KL", "fires")]
        + [
            (r["config"], r.get("mode", "-"), _pct(r.get("harmful_refusal_rate")))
            + (_pct(r.get("benign_refusal_rate")), _pct(r.get("benign_unchanged_rate")))
            + (_kl(r.get("benign_mean_kl")), _pct(r.get("benign_fire_rate")))
            for r in report.get("modes") or mode_summary(report["entries"])
        ]
    )
    pooled = report.get("leave_source_out") or leave_source_out(report["entries"])
    if pooled:
        lines += ["", "leave-source-out (harmful sets from files the patch never trained on):"]
        lines += _fixed(
            [("config", "mode", "held-out sets", "n", "refusal", "base")]
            + [
                (r["config"], r.get("mode", "-"), ", ".join(r["sets"]), str(r["n"]))
                + (_pct(r["refusal_rate"]), _pct(r["base_refusal_rate"]))
                for r in pooled
            ]
        )
    return "\n".join(lines)


def label(entry: dict[str, Any]) -> str:
    """`config` for the base model, `config (mode)` for a patched configuration."""
    return f"{entry['config']} ({entry['mode']})" if entry.get("mode") else entry["config"]


def entry_key(entry: dict[str, Any]) -> tuple[str, str, str]:
    """An entry's identity: configuration, prompt set and mode (stored results before modes
    existed were always-on)."""
    mode = entry.get("mode") or ("always" if entry.get("config") != "base" else "")
    return (entry.get("config", ""), entry.get("prompts", ""), mode)


def _fixed(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def leave_source_out(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per patched configuration and mode: refusal pooled over its held-out harmful sets
    (weighted by prompts scored), and the base model's on the same sets."""
    base = {e["prompts"]: e for e in entries if e["config"] == "base"}
    out = []
    patched = [(e["config"], e.get("mode")) for e in entries if e["config"] != "base"]
    for config, mode in dict.fromkeys(patched):
        held = [
            e
            for e in entries
            if (e["config"], e.get("mode")) == (config, mode)
            and e["kind"] == "harmful"
            and e.get("source") == "held-out"
        ]
        if not held:
            continue
        n = sum(e["n"] for e in held)
        refused = sum(e["refusal_rate"] * e["n"] for e in held)
        base_refused = sum(base[e["prompts"]]["refusal_rate"] * e["n"] for e in held)
        out.append(
            {
                "config": config,
                **({"mode": mode} if mode else {}),
                "sets": [e["prompts"] for e in held],
                "n": n,
                "refusal_rate": refused / n,
                "base_refusal_rate": base_refused / n,
            }
        )
    return out


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        "| config | mode | prompts | kind | split | n | source | refusal | unchanged | mean KL "
        "| gate fires |",
        "|---|---|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for e in report["entries"]:
        kl = e.get("mean_kl")
        lines.append(
            f"| {e['config']} | {e.get('mode', '-')} | {e['prompts']} | {e['kind']} | "
            f"{e.get('split', '-')} | {e['n']} | {e.get('source', '-')} | "
            f"{_pct(e['refusal_rate']).strip()} | {_pct(e.get('unchanged_rate')).strip()} | "
            f"{'-' if kl is None else f'{kl:.4f}'} | {_pct(e.get('fire_rate')).strip()} |"
        )
    return "\n".join(lines)


def category_table(report: dict[str, Any]) -> str:
    """Markdown: refusal per category (pooled over sets) for each configuration."""
    totals: dict[tuple[str, str], list[int]] = {}
    for e in report["entries"]:
        if e["kind"] != "harmful":
            continue
        for category, c in (e.get("categories") or {}).items():
            slot = totals.setdefault((label(e), category), [0, 0])
            slot[0] += c["refused"]
            slot[1] += c["n"]
    configs = list(dict.fromkeys(c for c, _ in totals))
    categories = sorted({c for _, c in totals})
    lines = ["| category | n | " + " | ".join(configs) + " |"]
    lines.append("|---|---:|" + "---:|" * len(configs))
    for category in categories:
        n = totals[(configs[0], category)][1] if (configs[0], category) in totals else 0
        cells = [
            _pct(totals[(c, category)][0] / totals[(c, category)][1]).strip()
            if (c, category) in totals
            else "-"
            for c in configs
        ]
        lines.append(f"| {category} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: refusal rate per prompt set (left), benign unchanged rate (right); one bar
    per configuration and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report["entries"]
    configs = list(dict.fromkeys(label(e) for e in entries))
    sets = list(dict.fromkeys(e["prompts"] for e in entries))
    benign = [s for s in sets if any(e["prompts"] == s and e["kind"] == "benign" for e in entries)]
    value = {(label(e), e["prompts"]): e for e in entries}
    fig, axes = plt.subplots(
        1, 2 if benign else 1, figsize=(13 if benign else 8, 4.5), squeeze=False
    )
    width = 0.8 / max(1, len(configs))
    for ax, names, key, title in (
        (axes[0][0], sets, "refusal_rate", "refusal rate (harmful: want high; benign: low)"),
        *(
            ((axes[0][1], benign, "unchanged_rate", "benign greedy outputs unchanged"),)
            if benign
            else ()
        ),
    ):
        for i, config in enumerate(configs):
            heights = [100 * (value.get((config, s), {}).get(key) or 0.0) for s in names]
            ax.bar([x + i * width for x in range(len(names))], heights, width, label=config)
        ax.set_xticks([x + width * (len(configs) - 1) / 2 for x in range(len(names))])
        ax.set_xticklabels([f"{s}\n({value[(configs[0], s)]['kind']})" for s in names], fontsize=7)
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
        ax.set_title(title, fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def store_in_patches(report: dict[str, Any], patch_dirs: Mapping[str, Path]) -> list[str]:
    """Write each patch's slice of the report into its safepatch.json; returns the names.

    Entries are merged by (config, prompts, mode): a new result replaces the stored one for the
    same configuration, prompt set and mode, other results are kept (each entry carries the
    `created_at` of the run that produced it). The patch's latest gate calibration run is kept
    in `gate_calibration` (the block itself is written by `app.factory.calibrate.store_gates`)."""
    from app.patches.metadata import PatchMetadata

    stored = []
    for name, adapter_dir in patch_dirs.items():
        metadata = PatchMetadata.read(adapter_dir)
        if metadata is None:
            continue
        run = {k: report[k] for k in ("created_at", "judge", "max_tokens") if k in report}
        fresh = [  # each entry says when, with which judge and length it was scored
            {k: v for k, v in e.items() if k not in ("examples", "responses")} | run
            for e in report["entries"]
            if e["config"] in ("base", name) or name in e["config"].split("+")
        ]
        keys = {entry_key(e) for e in fresh}
        old = (metadata.evaluation or {}).get("entries", [])
        old_capability = (metadata.evaluation or {}).get("capability")
        old_calibration = (metadata.evaluation or {}).get("gate_calibration")
        kept = [e for e in old if entry_key(e) not in keys]
        run_wide = ("entries", "prompt_sets", "leave_source_out", "capability", "gates")
        previous = {k: v for k, v in (metadata.evaluation or {}).items() if k not in run_wide}
        latest = {k: v for k, v in report.items() if k not in run_wide}
        # a capability-only run leaves the refusal results' run fields as they were
        metadata.evaluation = (latest if fresh else previous) | {"entries": kept + fresh}
        calibration = (report.get("gates") or {}).get(name) or old_calibration
        if calibration:  # this patch's latest calibration run
            metadata.evaluation["gate_calibration"] = calibration
        if "capability" in report:  # base, this patch and its stacks; replaces the last check
            capability = report["capability"]
            metadata.evaluation["capability"] = capability | {
                "results": [
                    r
                    for r in capability["results"]
                    if r["config"] in ("base", name) or name in r["config"].split("+")
                ]
            }
        elif old_capability:  # a refusal-only run keeps the stored capability check
            metadata.evaluation["capability"] = old_capability
        metadata.write(adapter_dir)
        stored.append(name)
    return stored
