"""The engine's LoRA table, with one owner: pins, unpins and unloads of retired LoRAs, each
under `engine_lock` (the `ServingTargets` state it reads is described there)."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from app.engine.types import EngineClient, LoraTarget
from app.exceptions import EngineRefused, PatchNotFound
from app.patches.storage import remove_dir

logger = logging.getLogger(__name__)


class EngineTable:
    """The unloading half of `ServingTargets` (app.patches.targets), which owns the state."""

    engine: EngineClient
    engine_lock: asyncio.Lock
    on_event: Callable[[str], None]
    retry_s: float
    _leases: dict[int, int]
    _used: set[int]
    _retired: dict[int, tuple[LoraTarget, bool]]
    _unloaded: set[int]
    _stacked: OrderedDict[str, LoraTarget]
    _unload_task: asyncio.Task[None] | None

    def is_live(self, target: LoraTarget) -> bool:  # defined by ServingTargets
        raise NotImplementedError

    async def set_pinned(self, target: LoraTarget, pinned: bool) -> None:
        """Pin `target` in the engine (loaded, never evicted) or unpin it, as the one owner of
        the engine's LoRA table. PatchNotFound if it was retired before or during the call (its
        unload pass runs next and undoes a pin); EngineRefused if the engine refused."""
        async with self.engine_lock:
            if not self.is_live(target):
                raise PatchNotFound(f"'{target.name}' is no longer served")
            try:
                if pinned:
                    await self.engine.pin_lora(target)
                else:  # vLLM has no unpin: unload, then load again unpinned
                    await self.engine.remove_lora(target)
            except Exception as exc:
                raise EngineRefused(
                    f"the engine could not {'pin' if pinned else 'unpin'} '{target.name}': {exc}"
                ) from exc
            if not pinned:
                try:  # only a warm-up: a request loads an unloaded LoRA on demand
                    await self.engine.add_lora(target)
                except Exception as exc:
                    logger.warning("reloading unpinned LoRA %s failed: %s", target.name, exc)
            if not self.is_live(target):
                raise PatchNotFound(f"'{target.name}' was deleted meanwhile")

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the engine's LoRA table: no unload pass, pin or other holder runs meanwhile."""
        async with self.engine_lock:
            yield

    def _schedule_unload(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the server's loop (CLI, tests): unload later
            return
        task = self._unload_task
        # One pending pass is enough: it rescans after every await, up to its (synchronous) end.
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._unload_task = loop.create_task(self.unload_retired())

    async def unload_retired(self) -> None:
        """Unload every retired LoRA that no lease holds; one pass at a time."""
        async with self.engine_lock:
            await self.unload_retired_locked()

    async def unload_retired_locked(self) -> None:
        """`unload_retired` for a caller already inside `exclusive()`."""
        failed: set[int] = set()  # retried by the next pass, not this one
        while True:
            int_id = next(
                (i for i in self._retired if not self._leases.get(i) and i not in failed), None
            )
            if int_id is None:
                return
            target = self._retired[int_id][0]
            if self.engine.is_ready:
                try:
                    await self.engine.remove_lora(target)
                except Exception as exc:
                    logger.warning("unloading LoRA %s failed (retried later): %s", target.name, exc)
                    failed.add(int_id)
                    asyncio.get_running_loop().call_later(self.retry_s, self._schedule_unload)
                    continue
                self.on_event("unloaded")
            if self._leases.get(int_id):  # leased while unloading: it goes again after that
                continue
            _, remove_files = self._retired.pop(int_id)
            self._leases.pop(int_id, None)  # a count of 0, or never leased
            self._used.discard(int_id)
            self._unloaded.add(int_id)
            if remove_files:
                self._remove_files(target.path)

    def _remove_files(self, path: Path) -> None:
        """Delete a retired LoRA's directory unless a live stack serves the same one (same
        patches, same weights); another retired LoRA on it inherits the deletion."""
        if any(t.path == path for t in self._stacked.values()):
            return
        for int_id, (other, _) in self._retired.items():
            if other.path == path:
                self._retired[int_id] = (other, True)
                return
        remove_dir(path)
