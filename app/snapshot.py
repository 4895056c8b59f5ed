"""Each replica's in-memory copy of the registry and tenant tables: the request path (key
lookup, policy, patch resolution) reads only this, never the database.

Freshness: every write bumps `changes.version` in its own transaction (app.db.bump_version).
A refresher polls that one-row table every `interval_s` on its own thread and reloads
everything when it moved, so a change made on any replica is seen by every other one within

    staleness ≤ interval_s + one poll + one reload   (0.25 s + a few ms by default)

while the database is reachable. The replica that made a change reloads at once (writes go
to the database first, then the snapshot), so it reads its own writes. While the database is
down the last snapshot keeps serving; the first successful poll after it returns catches up
with everything changed elsewhere in the meantime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from app import db
from app.patches.records import PatchRecord
from app.tenants.service import Tenant

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.25


@dataclass(frozen=True)
class Snapshot:
    """One consistent-enough view: read after `version`, so a write racing the load only
    makes the next poll reload again (it is never missed)."""

    version: int
    patches: Mapping[str, PatchRecord]  # active patches by name, in name order
    tenants: Mapping[str, Tenant]  # by id, in id order
    keys: Mapping[str, str]  # SHA-256 of an unrevoked API key -> tenant id


def load(conn: Connection, version: int) -> Snapshot:
    patch_rows = conn.execute(
        sa.select(db.patches).where(db.patches.c.status == "active").order_by(db.patches.c.name)
    ).all()
    tenant_rows = conn.execute(sa.select(db.tenants).order_by(db.tenants.c.id)).all()
    key_rows = conn.execute(
        sa.select(db.api_keys.c.key_hash, db.api_keys.c.tenant_id).where(
            db.api_keys.c.revoked_at.is_(None)
        )
    ).all()
    return Snapshot(
        version=version,
        patches={r.name: PatchRecord.from_row(r) for r in patch_rows},
        tenants={r.id: Tenant.from_row(r) for r in tenant_rows},
        keys={r.key_hash: r.tenant_id for r in key_rows},
    )


OnChange = Callable[[Snapshot, Snapshot], Awaitable[None]]


class Catalog:
    """The current snapshot of one database, and the refresher that keeps it current."""

    def __init__(
        self,
        database: Engine,
        *,
        replica_id: str | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.database = database
        self.replica_id = replica_id or db.default_replica_id()
        self.interval_s = interval_s
        self.database_ok = True
        self.last_error: str | None = None
        self._last_contact = time.monotonic()
        self._snapshot = Snapshot(-1, {}, {}, {})
        self._lock = threading.Lock()  # one reload at a time; versions only move forward
        self._task: asyncio.Task | None = None
        # its own thread: polls never queue behind other work in the default executor
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="snapshot")
        self.refresh()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def refresh(self) -> bool:
        """Reload if the database's version moved; True if it did. Blocking database I/O:
        call it from a thread (the refresher, a write), never on the event loop."""
        with self._lock:
            try:
                with self.database.connect() as conn:
                    version = db.read_version(conn)
                    changed = version > self._snapshot.version
                    if changed:
                        self._snapshot = load(conn, version)
            except db.CONNECTION_ERRORS as exc:
                if self.database_ok:
                    logger.warning("database unreachable; serving from the snapshot: %s", exc)
                self.database_ok = False
                self.last_error = str(exc).splitlines()[0]
                raise
            if not self.database_ok:
                logger.warning("database reachable again (snapshot version %d)", version)
            self.database_ok, self.last_error = True, None
            self._last_contact = time.monotonic()
            return changed

    # --- writes (blocking: from a thread) ---------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[Connection]:
        """One write transaction; once it commits, this replica's snapshot shows it. A lost
        database is the API's 503 `database_unavailable`."""
        with db.reachable():
            with self.database.begin() as conn:
                yield conn
            self.refresh()

    def audit(self, conn: Connection, actor: str, action: str, target: str, **detail: Any) -> None:
        """The audit row (with this replica's id) and the version bump, in `conn`'s write."""
        db.audit(conn, actor, action, target, replica=self.replica_id, **detail)

    def status(self) -> dict[str, Any]:
        """For /ready: whether the database answers and how old the snapshot may be."""
        return {
            "state": "ok" if self.database_ok else "unavailable",
            "snapshot_version": self._snapshot.version,
            "seconds_since_database_contact": round(time.monotonic() - self._last_contact, 3),
            "replica": self.replica_id,
            **({"error": self.last_error} if self.last_error else {}),
        }

    # --- the refresher: an asyncio task; the database I/O runs on the snapshot thread --------
    def start(self, on_change: OnChange | None = None) -> asyncio.Task:
        """Start polling (call from the server's lifespan); `on_change(old, new)` runs on the
        event loop after each reload (e.g. to unload patches deleted by another replica)."""
        self._task = asyncio.get_running_loop().create_task(self._run(on_change))
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, on_change: OnChange | None) -> None:
        loop = asyncio.get_running_loop()
        seen = self._snapshot
        while True:
            try:
                await loop.run_in_executor(self._executor, self.refresh)
            except db.CONNECTION_ERRORS:
                pass  # recorded by refresh; keep serving the last snapshot
            except Exception:
                logger.exception("snapshot refresh failed")
            current = self._snapshot
            if current is not seen and on_change is not None:
                try:
                    await on_change(seen, current)
                except Exception:
                    logger.exception("snapshot change handler failed")
            seen = current
            await asyncio.sleep(self.interval_s)
