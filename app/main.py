"""Builds the FastAPI app: state in the lifespan, routers, error mapping, middleware."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from app.api.middleware import install_middleware
from app.api.routes import admin_adapters, admin_tenants, health, openai, orthogonality
from app.config import Settings
from app.db import open_database
from app.engine.types import EngineClient
from app.errors import (
    install_error_handlers,
)
from app.observability.metrics import Metrics
from app.patches.registry import PatchRegistry
from app.patches.scores import schedule_scoring
from app.snapshot import Catalog
from app.state import AppState
from app.tenants.service import TenantService

logger = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, Path], EngineClient]
ENGINE_WATCH_INTERVAL_S = 0.5
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
        raise RuntimeError(
            "SAFEPATCH_ADMIN_TOKEN must be set to a secret of at least 16 "
            "characters (or set SAFEPATCH_DEV_MODE=1 for local development)"
        )
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


async def _start_engine(state: AppState, app: FastAPI) -> None:
    # app.server.run_server sets these; elsewhere (tests) on_fatal is a no-op
    on_fatal = getattr(app.state, "on_fatal", lambda: None)
    try:
        await state.engine.start()
    except Exception:
        # A server that can never become ready must say why and go away, so that its
        # supervisor (container runtime, systemd, k8s) sees the failure.
        logger.exception("engine failed to start; shutting down")
        _fail(state, on_fatal)
        return
    state.engine.attach_server(getattr(app.state, "uvicorn_server", None))
    state.metrics.engine_ready.set(1)
    for record in state.registry.list():
        if record.pinned:
            target = await state.registry.targets.for_patches([record])
            await state.registry.targets.set_pinned(target, True)  # serialised with unloads
            state.metrics.adapter_events.labels("loaded").inc()
    await _watch_engine(state, on_fatal)


def _fail(state: AppState, on_fatal: Callable[[], None]) -> None:
    state.engine_failed = True
    state.metrics.engine_ready.set(0)
    on_fatal()


async def _watch_engine(state: AppState, on_fatal: Callable[[], None]) -> None:
    """An engine process that died (OOM kill, crash) never comes back: `/ready` turns 503 at
    once and the server exits non-zero, so its supervisor restarts it. vLLM already fails
    the requests in flight and refuses new ones."""
    while not state.engine.errored:
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
    logger.error("the engine process died; shutting down")
    _fail(state, on_fatal)


def build_state(settings: Settings, engine_factory: EngineFactory) -> AppState:
    model_dir = resolve_model_dir(settings)
    database = open_database(settings.resolved_database_url)
    catalog = Catalog(
        database, replica_id=settings.replica_id, interval_s=settings.snapshot_refresh_s
    )
    registry = PatchRegistry(
        database,
        catalog=catalog,
        store_dir=settings.adapters_dir,
        cache_dir=settings.cache_dir,
        model_dir=model_dir,
        max_rank=settings.max_lora_rank,
        max_bytes=settings.max_adapter_bytes,
    )
    registry.scan_store()
    engine = engine_factory(settings, model_dir)
    registry.targets.engine = engine
    metrics = Metrics()
    registry.targets.on_event = lambda event: metrics.adapter_events.labels(event).inc()
    model_name = settings.served_model_name or model_dir.name
    return AppState(
        settings=settings,
        model_dir=model_dir,
        model_name=model_name,
        database=database,
        registry=registry,
        tenants=TenantService(database, catalog),
        metrics=metrics,
        engine=engine,
        admin_token=admin_secret(settings),
    )


def create_app(
    settings: Settings | None = None, engine_factory: EngineFactory = default_engine_factory
) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await asyncio.to_thread(build_state, settings, engine_factory)
        app.state.safepatch = state
        starting = asyncio.create_task(_start_engine(state, app))
        # the snapshot follows changes made through other replicas; this one unloads what
        # they deleted
        state.registry.catalog.start(on_change=state.registry.sync_engine)
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
            await state.registry.catalog.stop()
            await state.engine.shutdown()
            state.database.dispose()

    app = FastAPI(title="SafePatch", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    for router in (
        health.router,
        admin_adapters.router,
        admin_tenants.router,
        orthogonality.router,
        openai.router,
    ):
        app.include_router(router)

    app.openapi = openai.engine_openapi(app)  # type: ignore[method-assign]
    install_middleware(app, settings)
    return app
