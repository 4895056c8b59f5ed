"""Plot a soak's timeline (bench/soak.py's JSON): server RSS and throughput over time.

.venv/bin/python -m bench.soak_plot bench/results/soak_long.json   (writes the .png beside)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(result: dict, out: Path) -> None:
    timeline = result["timeline"]
    t = [s["t_s"] / 60 for s in timeline]
    rate = [
        (b["requests"] - a["requests"]) / max(b["t_s"] - a["t_s"], 1e-9)
        for a, b in zip(timeline, timeline[1:], strict=False)
    ]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    top.plot(t, [s["rss_mib"] for s in timeline], marker=".", label="process tree")
    if all("rss_main_mib" in s for s in timeline):
        engine = [s["rss_mib"] - s["rss_main_mib"] for s in timeline]
        top.plot(t, engine, marker=".", label="engine core (tree - server)")
        top.plot(t, [s["rss_main_mib"] for s in timeline], marker=".", label="server process")
        top.legend(fontsize="small")
    top.set_ylabel("RSS (MiB)")
    top.set_title(
        f"soak: {result['requests']} requests, {result['errors']} errors, "
        f"{result['mismatches']} mismatches, {result['leaks']} leaks, "
        f"RSS {result['rss_growth_pct']:+.2f} %"
    )
    bottom.step(t[1:], rate, where="pre")
    bottom.set_ylabel("requests/s")
    bottom.set_xlabel("minutes")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    source = Path(sys.argv[1])
    out = source.with_suffix(".png")
    plot(json.loads(source.read_text()), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
