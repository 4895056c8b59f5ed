"""Builds the FastAPI app: state in the lifespan, routers, error mapping, middleware."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request

from app.api.routes import admin_adapters, admin_tenants, health, openai, orthogonality
from app.config import Settings
from app.db import open_database
from app.engine.types import EngineClient
from app.errors import (
    PayloadTooLarge,
    error_response,
    install_error_handlers,
    internal_error_response,
)
from app.observability.logging import REQUEST_ID_HEADER, request_id_var
from app.observability.metrics import Metrics
from app.patches.registry import PatchRegistry
from app.patches.scores import schedule_scoring
from app.serving.completions import CompletionServing
from app.serving.prompts import PromptBuilder
from app.state import AppState
from app.tenants.service import TenantService

logger = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, Path], EngineClient]
WEAK_SECRETS = {"", "admin", "changeme", "secret", "password", "token"}


def resolve_model_dir(settings: Settings) -> Path:
    if settings.model:
        return Path(settings.model).resolve()
    from app.model.default_model import ensure_default_model

    return ensure_default_model(settings.cache_dir)


def admin_secret(settings: Settings) -> str:
    """The admin token; refuses a missing or weak one unless in dev mode."""
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if token.lower() not in WEAK_SECRETS and len(token) >= 16:
        return token
    if not settings.dev_mode:
        raise RuntimeError("SAFEPATCH_ADMIN_TOKEN must be set to a secret of at least 16 "
                           "characters (or set SAFEPATCH_DEV_MODE=1 for local development)")
    path = settings.cache_dir / "admin-token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    logger.warning("dev mode: admin token read from %s; anonymous requests allowed", path)
    return path.read_text().strip()


def default_engine_factory(settings: Settings, model_dir: Path) -> EngineClient:
    from app.engine.vllm_engine import VllmEngine

    return VllmEngine(settings, model_dir)


async def _start_engine(state: AppState) -> None:
    await state.engine.start()
    state.metrics.engine_ready.set(1)
    for record in state.registry.list():
        if record.pinned:
            await state.engine.pin_lora(state.registry.target(record))
            state.metrics.adapter_events.labels("loaded").inc()


def build_state(settings: Settings, engine_factory: EngineFactory) -> AppState:
    model_dir = resolve_model_dir(settings)
    database = open_database(settings.resolved_database_url)
    registry = PatchRegistry(database, store_dir=settings.adapters_dir,
                             cache_dir=settings.cache_dir, model_dir=model_dir,
                             max_rank=settings.max_lora_rank,
                             max_bytes=settings.max_adapter_bytes)
    registry.scan_store()
    engine = engine_factory(settings, model_dir)
    registry.engine = engine
    metrics = Metrics()
    model_name = settings.served_model_name or model_dir.name
    serving = CompletionServing(engine, PromptBuilder(model_dir, settings.max_model_len),
                                registry, metrics, model_name, settings.log_prompts)
    return AppState(settings=settings, model_dir=model_dir, model_name=model_name,
                    database=database, registry=registry, tenants=TenantService(database),
                    metrics=metrics, engine=engine, serving=serving,
                    admin_token=admin_secret(settings))


def create_app(settings: Settings | None = None,
               engine_factory: EngineFactory = default_engine_factory) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await asyncio.to_thread(build_state, settings, engine_factory)
        app.state.safepatch = state
        starting = asyncio.create_task(_start_engine(state))
        for record in state.registry.list():
            if record.orthogonality is None:
                schedule_scoring(state, record.name)
        try:
            yield
        finally:
            state.draining = True
            starting.cancel()
            for task in list(state.background):
                task.cancel()
            await state.engine.shutdown()
            state.database.dispose()

    app = FastAPI(title="SafePatch", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    for router in (health.router, openai.router, admin_adapters.router, admin_tenants.router,
                   orthogonality.router):
        app.include_router(router)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        rid = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        if len(rid) > 128 or not rid.isprintable():
            rid = uuid.uuid4().hex
        token = request_id_var.set(rid)
        start = time.perf_counter()
        try:
            length = int(request.headers.get("content-length") or 0)
            if length > settings.max_request_bytes and not request.url.path.startswith("/admin"):
                response = error_response(PayloadTooLarge(
                    f"request body is larger than {settings.max_request_bytes} bytes"))
            else:
                try:
                    response = await call_next(request)
                except Exception:
                    # answered here, not by the outermost handler, so that the 500 carries the
                    # request id (in the log line too) and is counted like any other response
                    logger.exception("unhandled error")
                    response = internal_error_response()
            response.headers[REQUEST_ID_HEADER] = rid
            route = request.scope.get("route")
            route_path = getattr(route, "path", "unmatched")
            tenant = getattr(request.state, "tenant", "anonymous")
            patches = getattr(request.state, "patches", [])
            seconds = time.perf_counter() - start
            state: AppState | None = getattr(request.app.state, "safepatch", None)
            if state is not None and request.url.path != "/metrics":
                state.metrics.observe_request(route_path, response.status_code, tenant, patches,
                                              seconds)
            # the access log: no query string, headers, body or prompt text
            logger.info("%s %s %d", request.method, request.url.path, response.status_code,
                        extra={"method": request.method, "route": route_path,
                               "status": response.status_code, "tenant": tenant,
                               "patches": ",".join(patches),
                               "duration_ms": round(seconds * 1000, 2)})
            return response
        finally:
            request_id_var.reset(token)

    return app
