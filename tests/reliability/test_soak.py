"""The soak (bench/soak.py) against the session's real server on the tiny model, short: mixed
concurrent requests (base, single, stacks, gated by policy and by metadata, streamed and not,
cancelled), admin churn (register by path and by upload, delete with streams in flight).

Every greedy answer equals its solo answer; no errors; nothing left behind (leases, engine
requests, churn adapters). The same test runs the long soak:

    SAFEPATCH_SOAK_SECONDS=600 SAFEPATCH_SOAK_OUT=bench/results/soak.json \\
        .venv/bin/python -m pytest -q tests/reliability/test_soak.py
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from bench.soak import parser, report, soak
from tests.conftest import ADMIN_TOKEN
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.slow


def test_soak(live_server: LiveServer, patch_library: Path, tmp_path: Path) -> None:
    seconds = os.environ.get("SAFEPATCH_SOAK_SECONDS", "30")
    out = Path(os.environ.get("SAFEPATCH_SOAK_OUT", tmp_path / "soak.json"))
    args = parser().parse_args(
        [
            f"--url={live_server.base_url}",
            f"--admin-token={ADMIN_TOKEN}",
            f"--pid={live_server.process.pid}",
            "--patches",
            "alpha",
            "beta",
            "gamma",
            "--gated=beta",
            f"--gate-upload={patch_library / 'alpha'}",
            "--churn-path=alpha",
            f"--churn-upload={patch_library / 'alpha'}",
            f"--duration={seconds}",
            f"--concurrency={os.environ.get('SAFEPATCH_SOAK_CONCURRENCY', '8')}",
            "--sample-interval=5",
            f"--out={out}",
        ]
    )
    result = asyncio.run(soak(args))
    report(result, out)
    assert result["errors"] == 0, result["first_errors"]
    assert result["mismatches"] == 0, result["first_mismatches"]
    assert result["leaks"] == 0, result["left_behind"]
    assert result["left_behind"]["engine_running"] is not None, "vLLM's metrics not on /metrics"
    assert result["left_behind"]["engine_requests"] is not None
    # the mix really ran: answers checked, cancellations, churn, both gate decisions
    assert result["checked_against_solo"] > 20 and result["cancelled"] > 0
    assert result["churn_cycles"] > 0
    decisions = {d.split("=")[1] for d in result["gate_decisions"]}
    assert decisions == {"fired", "passed"}, result["gate_decisions"]
    first = result["timeline"][0]
    assert first["rss_mib"] > first["rss_main_mib"] > 0, "RSS misses the engine core process"
    kinds = set(result["by_kind"])
    assert any(k.startswith("gated:") and k.endswith("/stream") for k in kinds), kinds
