"""The request path's database cost: requests/s of key lookup + policy + patch resolution
alone (no engine), on SQLite and PostgreSQL, before (the code at `--before`, which queried
the database on every request) and after (this tree: the in-memory snapshot); and the
staleness of a second replica (how long after a key is revoked on replica A it is refused
on replica B).

    .venv/bin/python -m bench.db_path [--before 1b39a24] [--seconds 3] [--repeats 3]
                                      [--revocations 40]

Each (code, database) cell runs in its own process with that code on PYTHONPATH (the old
tree comes from `git archive`), on a fresh database with three patches for the tiny model and
one tenant (mandatory alpha, default beta, optional gamma); a request asks for gamma, so it
resolves the stack alpha+beta+gamma. PostgreSQL is the test server of scripts/postgres.sh.
Prints a table, writes bench/results/db_path.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
PATCHES = {"alpha": ("q_proj", "v_proj"), "beta": ("o_proj",), "gamma": ("gate_proj",)}


# --- the worker: runs inside a process whose `app` is the code under test -------------------
def build_fixture(root: Path, url: str):  # noqa: ANN201 - the code under test's own types
    from app.db import open_database
    from app.patches.registry import PatchRegistry
    from app.snapshot import Catalog
    from app.tenants.policy import TenantPolicy
    from app.tenants.service import TenantService
    from tests.support.fake_engine import FakeEngine
    from tests.support.lora_adapters import make_lora_adapter
    from tests.support.tiny_model import build_tiny_llama

    model = build_tiny_llama(root / "tiny")
    for seed, (name, modules) in enumerate(PATCHES.items()):
        make_lora_adapter(
            model, root / "store" / name, r=4, alpha=8, target_modules=list(modules), seed=seed
        )
    database = open_database(url)
    registry = PatchRegistry(
        database,
        engine=FakeEngine(),
        catalog=Catalog(database),
        store_dir=root / "store",
        cache_dir=root / "cache",
        model_dir=model,
        max_rank=32,
        max_bytes=1 << 30,
    )
    registry.scan_store()
    tenants = TenantService(database, registry.catalog)
    policy = TenantPolicy(mandatory=["alpha"], default=["beta"], optional=["gamma"])
    tenants.create("acme", "Acme", policy, "bench")
    return database, registry, tenants, tenants.create_key("acme", "bench")["key"]


async def resolution_rate(registry, tenants, key: str, seconds: float) -> dict[str, float]:  # noqa: ANN001
    """What a /v1 request does before the engine: authenticate, then resolve its patches."""
    from app.tenants.access import Principal, resolve

    async def one() -> None:
        tenant = tenants.authenticate(key)
        resolved = await resolve(
            Principal(tenant.id, tenant.policy), "tiny", ["gamma"], None, "tiny", registry
        )
        assert resolved.patches == ["alpha", "beta", "gamma"]

    for _ in range(50):  # warm: the stack is built once, connections are pooled
        await one()
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        await one()
        latencies.append(time.perf_counter() - start)
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / sum(latencies),
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": statistics.quantiles(latencies, n=100)[98] * 1e6,
    }


async def staleness(database, tenants, revocations: int) -> dict[str, float]:  # noqa: ANN001
    """Replica B (its own snapshot and refresher) on A's database: seconds from A's revoke
    committing to B refusing the key, polled every 0.5 ms."""
    from app.exceptions import InvalidApiKey
    from app.snapshot import Catalog
    from app.tenants.service import TenantService

    replica_b = TenantService(database, Catalog(database, replica_id="bench-b"))
    replica_b.catalog.start()
    delays = []
    try:
        for _ in range(revocations):
            key = await asyncio.to_thread(tenants.create_key, "acme", "bench")
            while True:  # B must know the key first
                try:
                    replica_b.authenticate(key["key"])
                    break
                except InvalidApiKey:
                    await asyncio.sleep(0.0005)
            await asyncio.to_thread(tenants.revoke_key, "acme", key["id"], "bench")
            committed = time.perf_counter()
            while True:
                try:
                    replica_b.authenticate(key["key"])
                except InvalidApiKey:
                    break
                await asyncio.sleep(0.0005)
            delays.append(time.perf_counter() - committed)
    finally:
        await replica_b.catalog.stop()
    return {
        "revocations": revocations,
        "p50_s": statistics.median(delays),
        "p95_s": statistics.quantiles(delays, n=20)[18],
        "max_s": max(delays),
        "interval_s": replica_b.catalog.interval_s,
    }


def worker(url: str, seconds: float, revocations: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        database, registry, tenants, key = build_fixture(Path(tmp), url)
        result = {"resolution": asyncio.run(resolution_rate(registry, tenants, key, seconds))}
        if revocations:
            result["staleness"] = asyncio.run(staleness(database, tenants, revocations))
        database.dispose()
    print(json.dumps(result))


# --- the driver ----------------------------------------------------------------------------
def old_tree(ref: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "app"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def postgres_database(name: str) -> str:
    import sqlalchemy as sa

    server = subprocess.run(
        [str(REPO / "scripts" / "postgres.sh"), "start"], check=True, capture_output=True, text=True
    ).stdout.strip()
    engine = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server.rsplit("/", 1)[0] + f"/{name}"


def run_cell(tree: Path, url: str, seconds: float, revocations: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [
        sys.executable,
        str(Path(__file__)),
        "--worker",
        url,
        "--seconds",
        str(seconds),
        "--revocations",
        str(revocations),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="1b39a24", help="git ref of the code before")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--revocations", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "db_path.json")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.seconds, args.revocations)
        return
    runs: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": old_tree(args.before, Path(tmp)), "after": REPO}
        for repeat in range(args.repeats):  # the whole grid again: load hits every cell alike
            for database in ("sqlite", "postgresql"):
                for version, tree in trees.items():
                    url = (
                        f"sqlite:///{tmp}/{version}-{repeat}.db"
                        if database == "sqlite"
                        else postgres_database(f"bench_db_path_{version}")
                    )
                    revocations = args.revocations if version == "after" and not repeat else 0
                    result = run_cell(tree, url, args.seconds, revocations)
                    runs.setdefault(database, {}).setdefault(version, []).append(result)
    cells = {
        database: {
            version: {
                "requests_per_s": statistics.median(
                    r["resolution"]["requests_per_s"] for r in results
                ),
                "p50_us": statistics.median(r["resolution"]["p50_us"] for r in results),
                "p99_us": statistics.median(r["resolution"]["p99_us"] for r in results),
            }
            for version, results in pair.items()
        }
        for database, pair in runs.items()
    }
    for pair in cells.values():
        pair["speedup"] = pair["after"]["requests_per_s"] / pair["before"]["requests_per_s"]
    staleness_runs = {d: pair["after"][0]["staleness"] for d, pair in runs.items()}
    report = {
        "before_ref": args.before,
        "seconds_per_cell": args.seconds,
        "repeats": args.repeats,
        "median": cells,
        "postgresql_vs_sqlite_after": cells["postgresql"]["after"]["requests_per_s"]
        / cells["sqlite"]["after"]["requests_per_s"],
        "staleness": staleness_runs,
        "runs": runs,
    }
    print(
        "policy + patch resolution (authenticate, resolve alpha+beta+gamma): median of "
        f"{args.repeats} runs of {args.seconds:.0f} s"
    )
    print(f"{'database':<11} {'code':<13} {'req/s':>9} {'p50 µs':>8} {'p99 µs':>8}")
    for database, pair in cells.items():
        for version in ("before", "after"):
            r = pair[version]
            rate, p50, p99 = r["requests_per_s"], r["p50_us"], r["p99_us"]
            print(f"{database:<11} {version:<13} {rate:>9.0f} {p50:>8.1f} {p99:>8.1f}")
        print(f"{database:<11} {'after/before':<13} {pair['speedup']:>8.0f}x")
    print(f"after: PostgreSQL / SQLite = {report['postgresql_vs_sqlite_after']:.2f}")
    print("\nstaleness: key revoked on replica A -> refused on replica B")
    print(f"{'database':<11} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for database, s in staleness_runs.items():
        p50, p95, worst = (s[k] * 1e3 for k in ("p50_s", "p95_s", "max_s"))
        print(f"{database:<11} {s['revocations']:>4} {p50:>8.0f} {p95:>8.0f} {worst:>8.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
