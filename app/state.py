"""Everything a request handler may reach, built once per app in the lifespan
(app.composition.build_state)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from app.config import Settings
from app.engine.types import EngineClient
from app.observability.metrics import Metrics
from app.patches.registry import PatchRegistry
from app.patches.scores import Scorer
from app.tenants.service import TenantService


@dataclass
class AppState:
    settings: Settings
    model_dir: Path
    model_name: str
    database: Engine
    registry: PatchRegistry
    tenants: TenantService
    scorer: Scorer
    metrics: Metrics
    engine: EngineClient
    admin_token: str
    draining: bool = False
    engine_failed: bool = False
