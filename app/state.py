"""Everything a request handler may reach, built once per app in the lifespan."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from app.config import Settings
from app.engine.types import EngineClient
from app.observability.metrics import Metrics
from app.patches.registry import PatchRegistry
from app.tenants.service import TenantService


@dataclass
class AppState:
    settings: Settings
    model_dir: Path
    model_name: str
    database: Engine
    registry: PatchRegistry
    tenants: TenantService
    metrics: Metrics
    engine: EngineClient
    admin_token: str
    draining: bool = False
    engine_failed: bool = False
    background: set = field(default_factory=set)  # tasks kept alive until done
    # one orthogonality job at a time: each may fill the subspace cache with large SVDs
    scoring_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
