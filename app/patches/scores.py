"""Orthogonality scores of registered patches: computed off the event loop, one job at a
time (each reads cached base subspaces; the first one per model fills that cache), and stored
with the patch when scored in the background."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from app.patches.registry import PatchRegistry

logger = logging.getLogger(__name__)


class ScoreFunction(Protocol):
    def __call__(
        self, adapter_dir: Path, model_dir: Path, *, k: int | None, cache_dir: Path
    ) -> Any: ...


def orthogonality_score(
    adapter_dir: Path, model_dir: Path, *, k: int | None, cache_dir: Path
) -> Any:
    """The default score function: `app.orthogonality.scoring.score_adapter`."""
    from app.orthogonality.scoring import score_adapter

    return score_adapter(adapter_dir, model_dir, k=k, cache_dir=cache_dir)


class Scorer:
    """Scores patches with `score` (an AdapterScore-like result with `to_dict`); `on_scored`
    is told each stored background score (metrics). Tests pass their own `score`."""

    def __init__(
        self,
        registry: PatchRegistry,
        *,
        model_dir: Path,
        cache_dir: Path,
        default_k: int | None,
        score: ScoreFunction = orthogonality_score,
        on_scored: Callable[[], None] = lambda: None,
    ) -> None:
        self.registry = registry
        self.model_dir = model_dir
        self.cache_dir = cache_dir
        self.default_k = default_k
        self.score = score
        self.on_scored = on_scored
        self.background: set[asyncio.Task[None]] = set()  # kept alive until done
        self._lock: asyncio.Lock | None = None  # made on the loop that first scores

    def _one_at_a_time(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def compute(self, name: str, k: int | None = None) -> Any:
        """The score of a registered patch against the base model (blocking work in a thread).
        PatchNotFound for an unknown name; ValueError for a k the patch's modules do not allow."""
        record = self.registry.get(name)
        async with self._one_at_a_time():
            return await asyncio.to_thread(
                self.score, record.path, self.model_dir, k=k, cache_dir=self.cache_dir
            )

    async def _score_and_store(self, name: str) -> None:
        try:
            score = await self.compute(name, self.default_k)
            # a database write: off the event loop (it may wait seconds on a lost database)
            await asyncio.to_thread(
                self.registry.store_result, name, "orthogonality", score.to_dict(detail=False)
            )
            self.on_scored()
        except Exception:  # a scoring failure must not take the server down
            logger.exception("orthogonality scoring of %s failed", name)

    def schedule(self, name: str) -> None:
        """Score `name` in the background; requests are never blocked on it."""
        task = asyncio.get_running_loop().create_task(self._score_and_store(name))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def cancel(self) -> None:
        """Cancel background scoring (shutdown)."""
        for task in list(self.background):
            task.cancel()
