"""SafePatch metadata stored beside a PEFT adapter as `safepatch.json`."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from app.errors import BadRequest

METADATA_FILE = "safepatch.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class PatchMetadata(BaseModel):
    name: str
    description: str = ""
    categories: list[str] = Field(default_factory=list)
    base_model: dict[str, str] = Field(default_factory=dict)  # app.model.identity.model_identity
    rank: int
    target_modules: list[str]
    weights_sha256: str
    # rank_pattern/alpha_pattern give modules different scalings, which vLLM ignores: such a
    # patch is served through `combine_adapters([dir])`, which folds each module's scaling in.
    serve_folded: bool = False
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    training: dict[str, Any] | None = None  # hyper-parameters, data hash, command, time
    evaluation: dict[str, Any] | None = None  # latest `safepatch eval` report for this patch
    gate: dict[str, Any] | None = None  # app.patches.gate.GateSpec: default mode, decision rule

    @field_validator("gate")
    @classmethod
    def _gate(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        from app.patches.gate import GateSpec  # gate imports nothing of ours; kept lazy anyway

        return None if value is None else GateSpec.model_validate(value).model_dump()

    def write(self, adapter_dir: Path) -> None:
        (adapter_dir / METADATA_FILE).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, adapter_dir: Path) -> PatchMetadata | None:
        path = adapter_dir / METADATA_FILE
        return cls.model_validate_json(path.read_text()) if path.is_file() else None


def weights_sha256(adapter_dir: Path) -> str:
    return hashlib.sha256((adapter_dir / WEIGHTS_FILE).read_bytes()).hexdigest()


def invalid_metadata(exc: ValueError) -> BadRequest:
    """A 422 naming the first bad field of a `safepatch.json` (e.g. `metadata.gate.mode`)."""
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        return BadRequest(
            f"invalid safepatch.json: {field}: {first['msg']}",
            param=f"metadata.{field}",
            code="invalid_metadata",
            status_code=422,
        )
    return BadRequest(
        f"invalid safepatch.json: {exc}", param="metadata", code="invalid_metadata", status_code=422
    )
