"""The patch registry: which safety patches exist, persisted in the database, and how a set
of patch names becomes the one LoRA the engine serves (a stacked adapter for several).

Registering lives in app.patches.registration, the served LoRAs in app.patches.targets.
Engine side effects (pin, unload) go through the `EngineClient` given to the constructor.

Reads (`find`, `get`, `list`, `lora_for`) come from the replica's snapshot (app.snapshot), in
memory; writes go to the database, then reload the snapshot. The synchronous writes block on
the database and the store: call them from a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine

from app import db
from app.engine.types import EngineClient, LoraTarget
from app.exceptions import PatchNotFound
from app.patches.metadata import PatchMetadata
from app.patches.records import OPERATOR_GATE, PatchRecord
from app.patches.registration import Registration
from app.patches.targets import ServingTargets

if TYPE_CHECKING:  # the catalog is given to the constructor (app.composition builds it)
    from app.snapshot import Catalog, Snapshot

logger = logging.getLogger(__name__)


class PatchRegistry(Registration):
    def __init__(
        self,
        database: Engine,
        *,
        engine: EngineClient,
        catalog: Catalog,
        store_dir: Path,
        cache_dir: Path,
        model_dir: Path,
        max_rank: int,
        max_bytes: int,
        max_stacked: int = 32,
        on_event: Callable[[str], None] = lambda event: None,
    ) -> None:
        self.db = database
        self.catalog = catalog
        # (name, weights hash) retired by this replica's own delete, with its files
        self._retired_here: set[tuple[str, str]] = set()
        self.store_dir = store_dir.resolve()
        self.model_dir = model_dir
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.engine = engine
        self.targets = ServingTargets(
            cache_dir / "stacked", max_rank, max_stacked, engine=engine, on_event=on_event
        )
        self._pin_lock = asyncio.Lock()

    # --- reads (request path: memory only) -------------------------------------------
    def list(self) -> list[PatchRecord]:
        return list(self.catalog.snapshot.patches.values())

    def find(self, name: str) -> PatchRecord | None:
        return self.catalog.snapshot.patches.get(name)

    def get(self, name: str) -> PatchRecord:
        record = self.find(name)
        if record is None:
            raise PatchNotFound(f"safety patch '{name}' is not registered", param="name")
        return record

    # --- writes ----------------------------------------------------------------------
    async def delete(self, name: str, actor: str) -> None:
        record = self.get(name)
        # before the write: the refresher may see the deletion before this coroutine resumes
        retired = (record.name, record.sha256)
        self._retired_here.add(retired)
        try:
            await asyncio.to_thread(self._mark_deleted, record, actor)
        except BaseException:
            self._retired_here.discard(retired)
            raise
        # an uploaded patch's files are ours: gone once no request in flight needs them
        self.targets.retire_patch(record, remove_files=record.source == "upload")
        await self.targets.unload_retired()

    async def set_pinned(self, name: str, pinned: bool, actor: str) -> PatchRecord:
        # One pin change at a time, engine and database together: two concurrent calls must
        # not land in the engine in one order and in the database in the other.
        async with self._pin_lock:
            record = self.get(name)
            if self.engine.is_ready:
                # the LoRA that really serves this patch (a folded copy for serve_folded
                # ones); engine first, so a refusal (no free slot) leaves the database as is
                target = await self.targets.for_patches([record])
                assert target is not None  # one patch
                await self.targets.set_pinned(target, pinned)
            await asyncio.to_thread(self._mark_pinned, name, pinned, actor)
            return self.get(name)

    def set_gate(self, name: str, gate: dict[str, Any] | None, actor: str) -> PatchRecord:
        """An operator's gate rule for `name` (None: back to the rule in its safepatch.json),
        kept across restarts: the store's metadata no longer replaces it."""
        record = self.get(name)
        meta = {k: v for k, v in record.meta.items() if k != OPERATOR_GATE}
        if gate is None:
            on_disk = PatchMetadata.read(record.path)
            meta["gate"] = on_disk.gate if on_disk else None
        else:
            meta |= {"gate": gate, OPERATOR_GATE: True}
        with self.catalog.writing() as conn:
            conn.execute(
                db.patches.update()
                .where(db.patches.c.name == name)
                .values(meta=db.dumps(meta), updated_at=db.utcnow())
            )
            self.catalog.audit(conn, actor, "patch.gate", name, gate=gate)
        return self.get(name)

    def store_result(self, name: str, field: str, value: dict[str, Any]) -> None:
        """Save a background result (`orthogonality` or `evaluation`) with the patch."""
        with self.catalog.writing() as conn:
            conn.execute(
                db.patches.update()
                .where(db.patches.c.name == name)
                .values({field: db.dumps(value), "updated_at": db.utcnow()})
            )
            db.bump_version(conn)

    # --- database writes (blocking: from a thread) -------------------------------------
    def _mark_deleted(self, record: PatchRecord, actor: str) -> None:
        with self.catalog.writing() as conn:
            done = conn.execute(
                db.patches.update()
                .where(db.patches.c.name == record.name, db.patches.c.status == "active")
                .values(status="deleted", pinned=False, updated_at=db.utcnow())
            )
            if done.rowcount == 0:  # another replica deleted it first
                raise PatchNotFound(f"safety patch '{record.name}' is not registered", param="name")
            self.catalog.audit(conn, actor, "patch.delete", record.name, sha256=record.sha256)

    def _mark_pinned(self, name: str, pinned: bool, actor: str) -> None:
        with self.catalog.writing() as conn:
            conn.execute(
                db.patches.update()
                .where(db.patches.c.name == name)
                .values(pinned=pinned, updated_at=db.utcnow())
            )
            self.catalog.audit(conn, actor, "patch.pin" if pinned else "patch.unpin", name)

    # --- serving ---------------------------------------------------------------------
    async def sync_engine(self, old: Snapshot, new: Snapshot) -> None:
        """After a reload (the snapshot refresher's `on_change`): retire what another replica
        deleted or replaced, so this engine unloads it once its leases end. The files belong
        to the replica that deleted it."""
        for name, record in old.patches.items():
            current = new.patches.get(name)
            if current is not None and current.sha256 == record.sha256:
                continue
            key = (name, record.sha256)
            if key in self._retired_here:
                self._retired_here.discard(key)
                continue
            self.targets.retire_patch(record, remove_files=False)
        await self.targets.unload_retired()

    async def lora_for(self, names: list[str]) -> LoraTarget | None:
        """The single LoRA serving exactly the patches named."""
        return await self.lora_of([self.get(n) for n in set(names)])

    async def lora_of(self, records: Sequence[PatchRecord]) -> LoraTarget | None:
        """The single LoRA serving exactly these patches (see app.patches.targets)."""
        return await self.targets.for_patches(sorted(records, key=lambda r: r.name))
