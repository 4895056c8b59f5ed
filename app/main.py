"""Builds the FastAPI app: routers, error mapping, middleware. The services and their wiring
live in `app.composition`, which the lifespan runs."""

from __future__ import annotations

from fastapi import FastAPI

from app.api.middleware import install_middleware
from app.api.routes import admin_adapters, admin_tenants, health, openai, orthogonality
from app.composition import EngineFactory, ScorerFactory, default_engine_factory, lifespan
from app.config import Settings
from app.errors import install_error_handlers
from app.patches.scores import Scorer


def create_app(
    settings: Settings | None = None,
    engine_factory: EngineFactory = default_engine_factory,
    scorer_factory: ScorerFactory = Scorer,
) -> FastAPI:
    """The app: routers, error mapping, middleware; its services are built by
    `app.composition` when the lifespan starts (`engine_factory` and `scorer_factory` let
    tests put fakes in)."""
    settings = settings or Settings()
    app = FastAPI(
        title="SafePatch",
        version="0.1.0",
        lifespan=lifespan(settings, engine_factory, scorer_factory),
    )
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
