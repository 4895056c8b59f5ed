"""A registered patch as the registry keeps it (`PatchRecord`), and what can make one unservable."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.constants import WEIGHTS_FILE
from app.lora import LoraFormatError, read_checked
from app.patches.gate import GateRule
from app.patches.metadata import weights_sha256

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


def damage(record: PatchRecord) -> str | None:
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
