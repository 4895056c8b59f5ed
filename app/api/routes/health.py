"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import State

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(state: State) -> JSONResponse:
    """Liveness: 503 once the engine failed for good (it never recovers; the process exits)."""
    if state.engine_failed:
        return JSONResponse({"status": "failed"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(state: State) -> JSONResponse:
    """Serving readiness. The database is reported, not required: with it down, /v1 is
    served from the snapshot (admin writes answer 503), so the replica stays in rotation."""
    if state.engine_failed:
        return JSONResponse({"status": "failed"}, status_code=503)
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not state.engine.is_ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse(
        {"status": "ready", "model": state.model_name, "database": state.registry.catalog.status()}
    )


@router.get("/metrics")
async def metrics(state: State) -> Response:
    state.metrics.engine_ready.set(1 if state.engine.is_ready and not state.draining else 0)
    state.metrics.leases_held.set(state.registry.targets.leases_held())
    state.metrics.engine_requests.set(state.engine.requests_in_flight)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
