"""Orthogonality scores of registered patches: computed off the event loop, one job at a
time (each reads cached base subspaces; the first one per model fills that cache)."""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from app.state import AppState

logger = logging.getLogger(__name__)
# One lock per event loop: a module-level asyncio.Lock binds to the first loop that waits on
# it, and every later loop (a second app in one process, tests) then fails with RuntimeError.
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _one_at_a_time() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _locks.get(loop)
    if lock is None:
        lock = _locks[loop] = asyncio.Lock()
    return lock


async def compute_score(state: AppState, name: str, k: int | None = None) -> Any:
    """AdapterScore of a registered patch against the base model (blocking work in a thread)."""
    from app.orthogonality.scoring import score_adapter

    record = state.registry.get(name)
    async with _one_at_a_time():
        return await asyncio.to_thread(
            score_adapter, record.path, state.model_dir, k=k, cache_dir=state.settings.cache_dir
        )


async def _score_and_store(state: AppState, name: str) -> None:
    try:
        score = await compute_score(state, name, state.settings.ortho_k)
        # a database write: off the event loop (it may wait seconds on a lost database)
        await asyncio.to_thread(
            state.registry.store_result, name, "orthogonality", score.to_dict(detail=False)
        )
        state.metrics.adapter_events.labels("scored").inc()
    except Exception:  # a scoring failure must not take the server down
        logger.exception("orthogonality scoring of %s failed", name)


def schedule_scoring(state: AppState, name: str) -> None:
    """Score `name` in the background; requests are never blocked on it."""
    task = asyncio.get_running_loop().create_task(_score_and_store(state, name))
    state.background.add(task)
    task.add_done_callback(state.background.discard)
