"""The patch registry: which safety patches exist, persisted in the database, and how a set
of patch names becomes the one LoRA the engine serves (a stacked adapter for several).

Every write validates first and commits last, so a failed registration leaves neither files
nor rows behind. Engine side effects (pin, unload) go through the `EngineClient`.

Reads (`find`, `get`, `list`, `lora_for`) come from the replica's snapshot (app.snapshot), in
memory; writes go to the database, then reload the snapshot. The synchronous writes block on
the database and the store: call them from a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from app import db
from app.engine.types import EngineClient, LoraTarget
from app.errors import BadRequest, Conflict, NotFound
from app.patches.gate import GateRule
from app.patches.lora_io import LoraFormatError, read_checked
from app.patches.metadata import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    PatchMetadata,
    invalid_metadata,
    weights_sha256,
)
from app.patches.storage import remove_dir, storage_error
from app.patches.targets import ServingTargets
from app.patches.validation import AdapterValidationError, validate_adapter, validate_name

if TYPE_CHECKING:
    from app.snapshot import Catalog, Snapshot

logger = logging.getLogger(__name__)

INCOMING = ".incoming"  # upload staging inside the store; never scanned
OPERATOR_GATE = "gate_set_by_operator"  # meta key: the gate came from PUT .../gate


@dataclass
class PatchRecord:
    name: str
    path: Path
    sha256: str
    rank: int
    target_modules: list[str]
    meta: dict[str, Any]
    source: str
    pinned: bool
    orthogonality: dict[str, Any] | None
    evaluation: dict[str, Any] | None
    created_at: str

    @classmethod
    def from_row(cls, row: Any) -> PatchRecord:
        return cls(
            name=row.name,
            path=Path(row.path),
            sha256=row.sha256,
            rank=row.rank,
            target_modules=json.loads(row.target_modules),
            meta=json.loads(row.meta),
            source=row.source,
            pinned=bool(row.pinned),
            orthogonality=json.loads(row.orthogonality) if row.orthogonality else None,
            evaluation=json.loads(row.evaluation) if row.evaluation else None,
            created_at=row.created_at,
        )

    def summary(self) -> dict[str, Any]:
        ortho = self.orthogonality or {}
        return {
            "name": self.name,
            "rank": self.rank,
            "target_modules": self.target_modules,
            "sha256": self.sha256,
            "source": self.source,
            "pinned": self.pinned,
            "created_at": self.created_at,
            "description": self.meta.get("description", ""),
            "categories": self.meta.get("categories", []),
            "base_model": self.meta.get("base_model", {}),
            "orthogonality": {
                k: ortho.get(k)
                for k in ("orthogonality", "phi", "baseline", "left_orthogonality", "worst_module")
            }
            if ortho
            else None,
            "safety_effect": self.evaluation,
            "gate": GateRule.from_meta(self.meta).as_dict()
            | {"set_by": "operator" if self.meta.get(OPERATOR_GATE) else "metadata"},
        }


def _damage(record: PatchRecord) -> str | None:
    """Why a registered patch's files cannot be served as registered, or None: missing or
    unreadable files, a config or header that no longer parses, other weights than registered."""
    try:
        read_checked(record.path)
        if weights_sha256(record.path) != record.sha256:
            return f"{WEIGHTS_FILE} changed since registration (sha256 differs)"
    except LoraFormatError as exc:
        return exc.message
    except OSError as exc:
        return f"cannot read its files: {exc.strerror or exc}"
    return None


def _validation_to_api(exc: AdapterValidationError) -> BadRequest:
    return BadRequest(str(exc.message), param=exc.param, code=exc.code)


class PatchRegistry:
    def __init__(
        self,
        database: Engine,
        *,
        store_dir: Path,
        cache_dir: Path,
        model_dir: Path,
        max_rank: int,
        max_bytes: int,
        max_stacked: int = 32,
        catalog: Catalog | None = None,
    ) -> None:
        from app.snapshot import Catalog

        self.db = database
        self.catalog = catalog or Catalog(database)
        # (name, weights hash) retired by this replica's own delete, with its files
        self._retired_here: set[tuple[str, str]] = set()
        self.store_dir = store_dir.resolve()
        self.model_dir = model_dir
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.targets = ServingTargets(cache_dir / "stacked", max_rank, max_stacked)
        self._pin_lock = asyncio.Lock()

    @property
    def engine(self) -> EngineClient | None:
        return self.targets.engine

    # --- reads (request path: memory only) -------------------------------------------
    def list(self) -> list[PatchRecord]:
        return list(self.catalog.snapshot.patches.values())

    def find(self, name: str) -> PatchRecord | None:
        return self.catalog.snapshot.patches.get(name)

    def get(self, name: str) -> PatchRecord:
        record = self.find(name)
        if record is None:
            raise NotFound(
                f"safety patch '{name}' is not registered", param="name", code="patch_not_found"
            )
        return record

    # --- writes ----------------------------------------------------------------------
    def scan_store(self) -> list[str]:
        """Register every valid adapter directory in the store that the database has never
        seen (a deleted patch stays deleted). Invalid directories are logged and skipped; a
        registered patch whose files are damaged or gone is logged and not served (503) until
        they are restored (then restart) or it is deleted."""
        added = []
        with db.reachable(), self.db.connect() as conn:
            rows = conn.execute(sa.select(db.patches.c.name, db.patches.c.path)).all()
        known = {r.name for r in rows}
        # a directory registered (or deleted) under another name is not seen again either
        known_paths = {str(Path(r.path).resolve()) for r in rows}
        for record in self.list():
            damage = _damage(record)
            if damage:
                logger.error("safety patch %s is not served: %s", record.name, damage)
                self.targets.damaged[record.name] = damage
                continue
            try:  # `safepatch eval` writes its report beside the weights
                on_disk = PatchMetadata.read(record.path)
            except (OSError, ValueError):
                continue
            if on_disk and on_disk.evaluation and on_disk.evaluation != record.evaluation:
                self.store_result(record.name, "evaluation", on_disk.evaluation)
            # a recalibrated gate in safepatch.json, unless an operator set this patch's gate
            operator_set = record.meta.get(OPERATOR_GATE)
            if on_disk and not operator_set and on_disk.gate != record.meta.get("gate"):
                self.store_result(record.name, "meta", record.meta | {"gate": on_disk.gate})
        for path in sorted(self.store_dir.iterdir()) if self.store_dir.is_dir() else []:
            if path.name.startswith("."):  # upload staging, directories being deleted
                continue
            try:
                if (
                    path.name in known
                    or str(path.resolve()) in known_paths
                    or not path.resolve().is_relative_to(self.store_dir)  # no symlinks out
                ):
                    continue
                if not (path / CONFIG_FILE).is_file():
                    logger.warning("skipping %s in the store: no %s", path, CONFIG_FILE)
                    continue
                self._insert(path.name, path, source="scan", actor="startup-scan")
                added.append(path.name)
            except (BadRequest, Conflict) as exc:
                logger.warning("skipping adapter %s in the store: %s", path, exc.message)
            except OSError as exc:
                logger.warning("skipping adapter %s in the store: %s", path, exc)
        return added

    def register_path(self, name: str, path: str, actor: str) -> PatchRecord:
        self._check_name(name)
        raw = Path(path)
        candidate = (raw if raw.is_absolute() else self.store_dir / raw).resolve()
        if not candidate.is_relative_to(self.store_dir) or candidate == self.store_dir:
            raise BadRequest(
                "path must be a directory inside the adapter store",
                param="path",
                code="path_outside_store",
            )
        if not candidate.is_dir():
            raise BadRequest(
                f"no adapter directory at '{path}'", param="path", code="adapter_not_found"
            )
        return self._insert(name, candidate, source="path", actor=actor)

    def register_upload(
        self, name: str, config: bytes, weights: bytes, actor: str, metadata: bytes | None = None
    ) -> PatchRecord:
        """Stage the files in the store's `.incoming/`, validate, then move into place."""
        self._check_name(name)
        if len(config) + len(weights) > self.max_bytes:
            raise BadRequest(f"adapter is larger than {self.max_bytes} bytes", code="too_large")
        target = self.store_dir / name
        if target.exists():
            raise Conflict(f"the store already has a directory named '{name}'", param="name")
        staging = self.store_dir / INCOMING / uuid.uuid4().hex
        try:  # a full disk or unwritable store: a 5xx naming it, and nothing left behind
            staging.mkdir(parents=True)
            try:
                (staging / CONFIG_FILE).write_bytes(config)
                (staging / WEIGHTS_FILE).write_bytes(weights)
                if metadata:
                    (staging / "safepatch.json").write_bytes(metadata)
                self._validate(staging)
                try:  # atomic: of two replicas uploading one name, exactly one rename succeeds
                    staging.rename(target)
                except OSError as exc:
                    if not target.exists():
                        raise
                    raise Conflict(
                        f"the store already has a directory named '{name}'", param="name"
                    ) from exc
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                with contextlib.suppress(OSError):  # leave no empty staging dir in the store
                    staging.parent.rmdir()
            try:
                return self._insert(name, target, source="upload", actor=actor)
            except BaseException:
                remove_dir(target)
                raise
        except OSError as exc:
            raise storage_error(exc, f"storing adapter '{name}'") from exc

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
            if self.engine is not None and self.engine.is_ready:
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
                raise NotFound(
                    f"safety patch '{record.name}' is not registered",
                    param="name",
                    code="patch_not_found",
                )
            self.catalog.audit(conn, actor, "patch.delete", record.name, sha256=record.sha256)

    def _mark_pinned(self, name: str, pinned: bool, actor: str) -> None:
        with self.catalog.writing() as conn:
            conn.execute(
                db.patches.update()
                .where(db.patches.c.name == name)
                .values(pinned=pinned, updated_at=db.utcnow())
            )
            self.catalog.audit(conn, actor, "patch.pin" if pinned else "patch.unpin", name)

    def _check_name(self, name: str) -> None:
        try:
            validate_name(name)
        except AdapterValidationError as exc:
            raise _validation_to_api(exc) from exc

    def _validate(self, path: Path) -> Any:
        try:
            return validate_adapter(
                path, self.model_dir, max_rank=self.max_rank, max_bytes=self.max_bytes
            )
        except AdapterValidationError as exc:
            raise _validation_to_api(exc) from exc

    def _insert(self, name: str, path: Path, *, source: str, actor: str) -> PatchRecord:
        self._check_name(name)
        checked = self._validate(path)
        try:
            existing = PatchMetadata.read(path)
        except ValueError as exc:
            raise invalid_metadata(exc) from None
        meta = PatchMetadata(
            name=name,
            description=existing.description if existing else "",
            categories=existing.categories if existing else [],
            base_model=checked.base_model,
            serve_folded=checked.per_module_scaling,
            rank=checked.rank,
            target_modules=checked.target_modules,
            weights_sha256=checked.weights_sha256,
            training=existing.training if existing else None,
            evaluation=existing.evaluation if existing else None,
            gate=existing.gate if existing else None,
        )
        if source == "upload":  # our copy in the store: keep its metadata beside the weights
            meta.write(path)
        now = db.utcnow()
        values = dict(
            path=str(path),
            sha256=checked.weights_sha256,
            rank=checked.rank,
            target_modules=db.dumps(checked.target_modules),
            meta=meta.model_dump_json(),
            source=source,
            status="active",
            pinned=False,
            orthogonality=None,
            evaluation=db.dumps(meta.evaluation) if meta.evaluation else None,
            updated_at=now,
        )
        taken = Conflict(f"safety patch '{name}' is already registered", param="name")
        try:
            with self.catalog.writing() as conn:
                row = conn.execute(
                    sa.select(db.patches.c.status).where(db.patches.c.name == name)
                ).first()
                if row is not None and row.status == "active":
                    raise taken
                if row is None:
                    conn.execute(db.patches.insert().values(name=name, created_at=now, **values))
                else:  # only where it is still deleted: a racing re-registration loses
                    done = conn.execute(
                        db.patches.update()
                        .where(db.patches.c.name == name, db.patches.c.status == "deleted")
                        .values(**values)
                    )
                    if done.rowcount == 0:
                        raise taken
                self.catalog.audit(
                    conn,
                    actor,
                    "patch.register",
                    name,
                    source=source,
                    sha256=checked.weights_sha256,
                    path=str(path),
                )
        except sa.exc.IntegrityError:  # another replica inserted this name first
            raise taken from None
        return self.get(name)

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
        """The single LoRA serving exactly these patches (see app.patches.targets)."""
        return await self.targets.for_patches([self.get(n) for n in sorted(set(names))])
