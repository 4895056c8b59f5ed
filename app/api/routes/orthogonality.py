"""Admin API: each patch's subspace-orthogonality score against the base model."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from app.api.deps import Admin, State
from app.errors import APIError

router = APIRouter(prefix="/admin", tags=["admin"])

KQuery = Query(None, ge=1, le=4096, description="top-k base subspace; default: adapter rank")


async def _score(state: State, name: str, k: int | None) -> Any:
    try:
        return await state.scorer.compute(name, k)
    except ValueError as exc:  # k larger than a module allows, and the like
        raise APIError(str(exc), param="k", code="invalid_parameter", status_code=422) from None


@router.get("/adapters/{name}/orthogonality")
async def adapter_orthogonality(
    name: str,
    state: State,
    _: Admin,
    k: int | None = KQuery,
    side: Literal["right", "left", "both"] = "both",
    detail: bool = True,
) -> dict[str, Any]:
    score = await _score(state, name, k)
    return {**score.to_dict(detail=detail, side=side), "adapter": name}


@router.get("/adapters/{name}/orthogonality.png")
async def adapter_orthogonality_plot(
    name: str, state: State, _: Admin, k: int | None = KQuery
) -> FileResponse:
    from app.orthogonality.plot import plot_adapter_score

    score = await _score(state, name, k)
    out = state.settings.cache_dir / "plots" / f"{name}-k{k or 'r'}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(plot_adapter_score, score, out)
    return FileResponse(out, media_type="image/png")


@router.get("/orthogonality")
async def all_orthogonality(state: State, _: Admin) -> dict[str, Any]:
    from app.orthogonality.interference import interference

    records = state.registry.list()
    rows = []
    for record in records:
        summary = record.orthogonality
        if summary is None:
            summary = (await _score(state, record.name, state.settings.ortho_k)).to_dict(
                detail=False
            )
        rows.append({"adapter": record.name, **summary})
    pairs = await asyncio.to_thread(interference, {r.name: r.path for r in records})
    return {"object": "list", "data": rows, "interference": pairs}
