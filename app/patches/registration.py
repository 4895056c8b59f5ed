"""Registering patches: from the store at start-up, from a path in the store, or uploaded.

Every registration validates first and commits last, so a failed one leaves neither files nor
rows behind. The synchronous methods block on the database and the store: call them from a
thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from app import db
from app.constants import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE
from app.exceptions import AlreadyExists, InvalidRequest
from app.patches.metadata import PatchMetadata, invalid_metadata
from app.patches.records import OPERATOR_GATE, PatchRecord, damage
from app.patches.storage import remove_dir, storage_error
from app.patches.targets import ServingTargets
from app.patches.validation import ValidatedAdapter, validate_adapter, validate_name

if TYPE_CHECKING:
    from app.snapshot import Catalog

logger = logging.getLogger(__name__)

INCOMING = ".incoming"  # upload staging inside the store; never scanned


class Registration:
    """The registering half of `PatchRegistry` (app.patches.registry), which owns the state."""

    db: Engine
    catalog: Catalog
    store_dir: Path
    model_dir: Path
    max_rank: int
    max_bytes: int
    targets: ServingTargets

    def list(self) -> list[PatchRecord]:  # defined by PatchRegistry
        raise NotImplementedError

    def get(self, name: str) -> PatchRecord:  # defined by PatchRegistry
        raise NotImplementedError

    def store_result(self, name: str, field: str, value: dict[str, Any]) -> None:
        raise NotImplementedError  # defined by PatchRegistry

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
            why = damage(record)
            if why:
                logger.error("safety patch %s is not served: %s", record.name, why)
                self.targets.damaged[record.name] = why
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
            except (InvalidRequest, AlreadyExists) as exc:
                logger.warning("skipping adapter %s in the store: %s", path, exc.message)
            except OSError as exc:
                logger.warning("skipping adapter %s in the store: %s", path, exc)
        return added

    def register_path(self, name: str, path: str, actor: str) -> PatchRecord:
        validate_name(name)
        raw = Path(path)
        candidate = (raw if raw.is_absolute() else self.store_dir / raw).resolve()
        if not candidate.is_relative_to(self.store_dir) or candidate == self.store_dir:
            raise InvalidRequest(
                "path must be a directory inside the adapter store",
                param="path",
                code="path_outside_store",
            )
        if not candidate.is_dir():
            raise InvalidRequest(
                f"no adapter directory at '{path}'", param="path", code="adapter_not_found"
            )
        return self._insert(name, candidate, source="path", actor=actor)

    def register_upload(
        self, name: str, config: bytes, weights: bytes, actor: str, metadata: bytes | None = None
    ) -> PatchRecord:
        """Stage the files in the store's `.incoming/`, validate, then move into place."""
        validate_name(name)
        if len(config) + len(weights) > self.max_bytes:
            raise InvalidRequest(f"adapter is larger than {self.max_bytes} bytes", code="too_large")
        target = self.store_dir / name
        if target.exists():
            raise AlreadyExists(f"the store already has a directory named '{name}'", param="name")
        staging = self.store_dir / INCOMING / uuid.uuid4().hex
        try:  # a full disk or unwritable store: a 5xx naming it, and nothing left behind
            staging.mkdir(parents=True)
            try:
                (staging / CONFIG_FILE).write_bytes(config)
                (staging / WEIGHTS_FILE).write_bytes(weights)
                if metadata:
                    (staging / METADATA_FILE).write_bytes(metadata)
                self._validate(staging)
                try:  # atomic: of two replicas uploading one name, exactly one rename succeeds
                    staging.rename(target)
                except OSError as exc:
                    if not target.exists():
                        raise
                    raise AlreadyExists(
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

    def _validate(self, path: Path) -> ValidatedAdapter:
        return validate_adapter(
            path, self.model_dir, max_rank=self.max_rank, max_bytes=self.max_bytes
        )

    def _insert(self, name: str, path: Path, *, source: str, actor: str) -> PatchRecord:
        validate_name(name)
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
        taken = AlreadyExists(f"safety patch '{name}' is already registered", param="name")
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
