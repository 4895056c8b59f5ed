"""Admin API for the patch registry: list, inspect, register (path or upload), delete, pin,
set a patch's gate rule.

Reads come from the replica's snapshot; registration (validation reads the weights) and the
database writes run in a worker thread, never on the event loop. With the database down,
writes answer 503 `database_unavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from app.api.deps import Admin, State
from app.errors import BadRequest, Conflict
from app.patches.gate import GateSpec
from app.patches.metadata import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE
from app.patches.scores import schedule_scoring
from app.patches.storage import storage_error

router = APIRouter(prefix="/admin/adapters", tags=["admin"])

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@contextmanager
def storage_faults(doing: str) -> Iterator[None]:
    """An OSError that escaped the registry's own handling (a spooled upload on a full /tmp,
    an unreadable store) as an OpenAI-shaped 5xx naming it, not a bare 500."""
    try:
        yield
    except OSError as exc:
        raise storage_error(exc, doing) from exc


class RegisterFromPath(BaseModel):
    name: str
    path: str


def _detail(state: State, name: str) -> dict[str, Any]:
    record = state.registry.get(name)
    return {
        **record.summary(),
        "path": str(record.path),
        "metadata": record.meta,
        "orthogonality_detail": record.orthogonality,
    }


@router.get("")
async def list_adapters(state: State, _: Admin) -> dict[str, Any]:
    return {"object": "list", "data": [p.summary() for p in state.registry.list()]}


@router.get("/{name}")
async def get_adapter(name: str, state: State, _: Admin) -> dict[str, Any]:
    return _detail(state, name)


async def _read_upload(request: Request, state: State, actor: str):
    form = await request.form()  # size already bounded by BodySizeLimit
    name = form.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("multipart upload needs a 'name' field", param="name", code="missing_name")
    files: dict[str, bytes] = {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            continue
        filename = (value.filename or key).rsplit("/", 1)[-1]
        if filename.endswith(PICKLE_SUFFIXES):
            raise BadRequest(
                f"'{filename}': pickled weights are refused; upload safetensors",
                param=key,
                code="pickle_weights_refused",
            )
        kind = (
            CONFIG_FILE
            if filename.endswith(".json") and filename != METADATA_FILE
            else METADATA_FILE
            if filename == METADATA_FILE
            else WEIGHTS_FILE
            if filename.endswith(".safetensors")
            else None
        )
        if kind is None:
            raise BadRequest(f"unexpected file '{filename}'", param=key, code="unexpected_file")
        files[kind] = await value.read()
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in files]
    if missing:
        raise BadRequest(
            f"upload is missing {', '.join(missing)}", param="files", code="missing_files"
        )
    return await asyncio.to_thread(
        state.registry.register_upload,
        name,
        files[CONFIG_FILE],
        files[WEIGHTS_FILE],
        actor,
        metadata=files.get(METADATA_FILE),
    )


# The handler reads the body itself (JSON or multipart); this documents both for clients and
# for schema-driven tests (tests/reliability/test_api_fuzz.py).
REGISTER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": RegisterFromPath.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "config", "weights"],
                    "properties": {
                        "name": {"type": "string"},
                        "config": {"type": "string", "format": "binary"},
                        "weights": {"type": "string", "format": "binary"},
                        "metadata": {"type": "string", "format": "binary"},
                    },
                }
            },
        },
    }
}


@router.post("", status_code=201, openapi_extra=REGISTER_BODY)
async def register_adapter(request: Request, state: State, actor: Admin) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    with storage_faults("registering the adapter"):
        if content_type.startswith("multipart/form-data"):
            record = await _read_upload(request, state, actor)
        else:
            try:
                body = RegisterFromPath.model_validate_json(await request.body())
            except ValueError as exc:
                raise BadRequest(
                    f"expected JSON {{'name', 'path'}} or a multipart upload: {exc}",
                    code="invalid_body",
                ) from None
            record = await asyncio.to_thread(
                state.registry.register_path, body.name, body.path, actor
            )
    state.metrics.adapter_events.labels("registered").inc()
    schedule_scoring(state, record.name)
    return _detail(state, record.name)


@router.delete("/{name}", status_code=204)
async def delete_adapter(name: str, state: State, actor: Admin) -> Response:
    users = [t.id for t in state.tenants.list() if name in t.policy.allowed()]
    if users:
        raise Conflict(
            f"patch '{name}' is named in the policies of tenants "
            f"{', '.join(users)}; remove it from them first",
            param="name",
            code="patch_in_use",
        )
    with storage_faults(f"deleting adapter '{name}'"):
        await state.registry.delete(name, actor)
    state.metrics.adapter_events.labels("deleted").inc()
    return Response(status_code=204)


@router.put("/{name}/gate")
async def set_gate(name: str, rule: GateSpec, state: State, actor: Admin) -> dict[str, Any]:
    """Override the patch's gate rule (default mode, signal, threshold); it is reported with
    the patch and kept until `DELETE .../gate` restores the rule in its safepatch.json."""
    await asyncio.to_thread(state.registry.set_gate, name, rule.model_dump(), actor)
    return _detail(state, name)


@router.delete("/{name}/gate")
async def reset_gate(name: str, state: State, actor: Admin) -> dict[str, Any]:
    await asyncio.to_thread(state.registry.set_gate, name, None, actor)
    return _detail(state, name)


@router.post("/{name}/pin")
async def pin_adapter(name: str, state: State, actor: Admin) -> dict[str, Any]:
    await state.registry.set_pinned(name, True, actor)
    state.metrics.adapter_events.labels("pinned").inc()
    return _detail(state, name)


@router.post("/{name}/unpin")
async def unpin_adapter(name: str, state: State, actor: Admin) -> dict[str, Any]:
    await state.registry.set_pinned(name, False, actor)
    return _detail(state, name)
