"""The composition root: builds every service of one app from its Settings, wires them through
their constructors, and runs their life (engine start and watch, background scoring, the
snapshot refresher, shutdown). `app.main` builds the FastAPI app around it."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from app.config import Settings
from app.db import open_database
from app.engine.types import EngineClient
from app.model.default_model import resolve_model_dir
from app.observability.metrics import Metrics
from app.patches.registry import PatchRegistry
from app.patches.scores import Scorer
from app.snapshot import Catalog
from app.state import AppState
from app.tenants.service import TenantService

logger = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, Path], EngineClient]
ScorerFactory = Callable[..., Scorer]  # Scorer's constructor, or a test's stand-in
ENGINE_WATCH_INTERVAL_S = 0.5
WEAK_SECRETS = {"", "admin", "changeme", "secret", "password", "token"}


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


def build_state(
    settings: Settings, engine_factory: EngineFactory, scorer_factory: ScorerFactory = Scorer
) -> AppState:
    """Every service, each given what it needs through its constructor (blocking: the model
    may be converted and the store scanned; call it from a thread)."""
    model_dir = resolve_model_dir(settings)
    database = open_database(settings.resolved_database_url)
    catalog = Catalog(
        database, replica_id=settings.replica_id, interval_s=settings.snapshot_refresh_s
    )
    metrics = Metrics()
    engine = engine_factory(settings, model_dir)
    registry = PatchRegistry(
        database,
        engine=engine,
        catalog=catalog,
        store_dir=settings.adapters_dir,
        cache_dir=settings.cache_dir,
        model_dir=model_dir,
        max_rank=settings.max_lora_rank,
        max_bytes=settings.max_adapter_bytes,
        on_event=lambda event: metrics.adapter_events.labels(event).inc(),
    )
    registry.scan_store()
    scorer = scorer_factory(
        registry,
        model_dir=model_dir,
        cache_dir=settings.cache_dir,
        default_k=settings.ortho_k,
        on_scored=lambda: metrics.adapter_events.labels("scored").inc(),
    )
    return AppState(
        settings=settings,
        model_dir=model_dir,
        model_name=settings.served_model_name or model_dir.name,
        database=database,
        registry=registry,
        tenants=TenantService(database, catalog),
        scorer=scorer,
        metrics=metrics,
        engine=engine,
        admin_token=admin_secret(settings),
    )


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


def lifespan(
    settings: Settings, engine_factory: EngineFactory, scorer_factory: ScorerFactory = Scorer
) -> Callable[[FastAPI], AsyncIterator[None]]:
    """The app's lifespan: build the state, start the engine (and watch it), follow other
    replicas' changes, score what is unscored; on the way out, drain and shut down."""

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        state = await asyncio.to_thread(build_state, settings, engine_factory, scorer_factory)
        app.state.safepatch = state
        starting = asyncio.create_task(_start_engine(state, app))
        # the snapshot follows changes made through other replicas; this one unloads what
        # they deleted
        state.registry.catalog.start(on_change=state.registry.sync_engine)
        for record in state.registry.list():
            if record.orthogonality is None:
                state.scorer.schedule(record.name)
        try:
            yield
        finally:
            state.draining = True
            starting.cancel()
            state.scorer.cancel()
            await state.registry.catalog.stop()
            await state.engine.shutdown()
            state.database.dispose()

    return run
