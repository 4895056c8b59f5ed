"""Patch sets -> the one LoRA the engine serves, and that LoRA's life in the engine.

A single patch is served as itself; several (or one whose per-module scalings vLLM would
ignore) as their exact stack, built once per combination, cached on disk under a name keyed
by the weights' hashes and kept in an LRU. Requests lease the LoRA they use; a retired LoRA
(deleted patch, evicted stack) is unloaded from the engine only when its last lease ends.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from app.engine.types import EngineClient, LoraTarget
from app.errors import BadRequest
from app.patches.metadata import WEIGHTS_FILE
from app.patches.stacking import combine_adapters, combined_name


class PatchLike(Protocol):
    name: str
    sha256: str
    rank: int
    path: Path
    meta: dict


class ServingTargets:
    def __init__(self, stack_dir: Path, max_rank: int, max_stacked: int = 32) -> None:
        self.stack_dir = stack_dir
        self.max_rank = max_rank
        self.max_stacked = max_stacked
        self.engine: EngineClient | None = None
        self.on_event: Callable[[str], None] = lambda event: None  # metrics hook
        self._ids: dict[tuple[str, str], int] = {}  # (name, weights hash) -> lora_int_id
        self._stacked: OrderedDict[str, LoraTarget] = OrderedDict()  # LRU of combinations
        self._build_locks: dict[str, asyncio.Lock] = {}  # one build per combination
        self._leases: dict[int, int] = {}  # lora_int_id -> requests in flight
        self._used: set[int] = set()  # ids the engine has been asked to serve
        # unload (and maybe delete from disk) once their leases end
        self._retired: dict[int, tuple[LoraTarget, bool]] = {}

    def _int_id(self, name: str, digest: str) -> int:
        int_id = self._ids.setdefault((name, digest), len(self._ids) + 1)
        self._retired.pop(int_id, None)  # asked for again: keep it loaded
        return int_id

    def single(self, patch: PatchLike) -> LoraTarget:
        return LoraTarget(patch.name, self._int_id(patch.name, patch.sha256), patch.path)

    async def for_patches(self, patches: Sequence[PatchLike]) -> LoraTarget | None:
        """The LoRA serving exactly `patches` (sorted by name): none, the patch, or a stack."""
        if not patches:
            return None
        if len(patches) == 1 and not patches[0].meta.get("serve_folded"):
            return self.single(patches[0])
        key = "+".join(p.name for p in patches)
        rank = sum(p.rank for p in patches)
        if rank > self.max_rank:
            raise BadRequest(
                f"stacking {key} needs LoRA rank {rank}, above the engine's max_lora_rank "
                f"{self.max_rank}",
                param="safety_patches",
                code="stacked_rank_too_large",
            )
        disk_name = combined_name([p.name for p in patches], [p.sha256 for p in patches])
        cached = self._stacked.get(key)
        if cached is not None and cached.path.name == disk_name:
            self._stacked.move_to_end(key)
            return cached
        out_dir = self.stack_dir / disk_name
        lock = self._build_locks.setdefault(disk_name, asyncio.Lock())
        async with lock:
            if not (out_dir / WEIGHTS_FILE).is_file():
                await asyncio.to_thread(combine_adapters, [p.path for p in patches], out_dir)
                self.on_event("stacked")
        self._build_locks.pop(disk_name, None)
        target = LoraTarget(key, self._int_id(disk_name, disk_name), out_dir)
        self._stacked[key] = target
        while len(self._stacked) > self.max_stacked:
            # Unloaded from the engine, files kept: a request that resolved this stack but has
            # not started yet can still load it from disk.
            self.retire(self._stacked.popitem(last=False)[1])
            self.on_event("evicted")
        return target

    @contextmanager
    def lease(self, target: LoraTarget | None) -> Iterator[None]:
        """Hold `target` while a request uses it, so unloading waits for it to finish."""
        release = self.acquire(target)
        try:
            yield
        finally:
            release()

    def acquire(self, target: LoraTarget | None) -> Callable[[], None]:
        """Take a lease on `target` now; the returned function ends it (idempotent). For leases
        that outlive one call stack, such as a streamed response."""
        if target is None:
            return lambda: None
        if target.int_id not in self._used:
            self._used.add(target.int_id)
            self.on_event("loaded")
        self._leases[target.int_id] = self._leases.get(target.int_id, 0) + 1
        held = [True]

        def release() -> None:
            if not held[0]:
                return
            held[0] = False
            self._leases[target.int_id] -= 1
            if not self._leases[target.int_id] and target.int_id in self._retired:
                self._schedule_unload()

        return release

    def leases_held(self) -> int:
        """Requests in flight that hold a LoRA (0 when idle: nothing leaked)."""
        return sum(self._leases.values())

    def retire(self, target: LoraTarget, remove_files: bool = False) -> None:
        self._retired[target.int_id] = (target, remove_files)
        self._schedule_unload()

    def retire_patch(self, patch: PatchLike, remove_files: bool = False) -> None:
        """A deleted patch: retire it and every cached stack that contains it."""
        for key in [k for k in self._stacked if patch.name in k.split("+")]:
            self.retire(self._stacked.pop(key), remove_files=True)
        int_id = self._int_id(patch.name, patch.sha256)
        self.retire(LoraTarget(patch.name, int_id, patch.path), remove_files)

    def _schedule_unload(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the server's loop (CLI, tests): unload later
            return
        loop.create_task(self.unload_retired())

    async def unload_retired(self) -> None:
        for int_id, (target, remove_files) in list(self._retired.items()):
            if self._leases.get(int_id):
                continue
            del self._retired[int_id]
            self._used.discard(int_id)
            if self.engine is not None and self.engine.is_ready:
                await self.engine.remove_lora(target)
                self.on_event("unloaded")
            if remove_files:
                shutil.rmtree(target.path, ignore_errors=True)
