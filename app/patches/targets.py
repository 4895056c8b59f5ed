"""Patch sets -> the one LoRA the engine serves, and that LoRA's life in the engine.

A single patch is served as itself; several (or one whose per-module scalings vLLM would
ignore) as their exact stack, built once per combination, cached on disk under a name keyed
by the weights' hashes and kept in an LRU. Requests lease the LoRA they use; a retired LoRA
(deleted patch, evicted stack) is unloaded from the engine only when its last lease ends.

Race-freedom by construction:
- Every state change here (resolve, lease, release, retire) is synchronous, so no other task
  ever sees one half-done; only engine calls and stack builds await.
- One owner for the engine's LoRA table: every load, pin and unload runs under `engine_lock`
  (`exclusive()`), so unload passes never interleave with each other or with a pin.
- A retired LoRA id is never handed out again: asking for the patch (or stack) afresh gives a
  new id, so an unload in flight can never hit a request that resolved after the retirement.
- Retiring and unloading are idempotent: a LoRA leaves `_retired` only once its engine unload
  succeeded, by the one pass that unloaded it; a failed unload is logged and retried next pass.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from app.constants import WEIGHTS_FILE
from app.engine.types import EngineClient, LoraTarget
from app.exceptions import (
    DomainError,
    PatchNotFound,
    PatchUnavailable,
    RankTooLarge,
    Unstackable,
)
from app.patches.stacking import StackingError, combine_adapters, combined_name
from app.patches.storage import remove_dir, storage_error
from app.patches.unloading import EngineTable

logger = logging.getLogger(__name__)


class PatchLike(Protocol):
    name: str
    sha256: str
    rank: int
    path: Path
    meta: dict


class ServingTargets(EngineTable):
    def __init__(
        self,
        stack_dir: Path,
        max_rank: int,
        max_stacked: int = 32,
        *,
        engine: EngineClient,
        on_event: Callable[[str], None] = lambda event: None,
    ) -> None:
        self.stack_dir = stack_dir
        self.max_rank = max_rank
        self.max_stacked = max_stacked
        self.engine = engine
        self.on_event = on_event  # adapter events, for metrics: "loaded", "stacked", ...
        self.engine_lock = asyncio.Lock()  # held by every engine LoRA call (see `exclusive`)
        self._new_id = itertools.count(1)
        # (name, weights hash) -> the live LoRA for it, and the reverse: what new requests get
        self._ids: dict[tuple[str, str], LoraTarget] = {}
        self._live: dict[int, tuple[str, str]] = {}
        self._stacked: OrderedDict[str, LoraTarget] = OrderedDict()  # LRU of combinations
        self._build_locks: dict[str, asyncio.Lock] = {}  # one build per combination
        self._building: Counter[str] = Counter()  # builds waiting on or holding each lock
        self._deletions: Counter[str] = Counter()  # patch name -> deletes (a build checks it)
        self._leases: dict[int, int] = {}  # lora_int_id -> requests in flight
        self._used: set[int] = set()  # ids the engine has been asked to serve
        # unload (and maybe delete from disk) once their leases end
        self._retired: dict[int, tuple[LoraTarget, bool]] = {}
        self._unloaded: set[int] = set()  # retired ids already out of the engine
        self._unload_task: asyncio.Task[None] | None = None
        # registered patches whose files were found damaged at start-up -> why (not served)
        self.damaged: dict[str, str] = {}
        self.retry_s = 1.0  # a failed unload is tried again after this long (or sooner)

    # --- resolving -------------------------------------------------------------------
    def _target(self, key: tuple[str, str], name: str, path: Path) -> LoraTarget:
        """The live LoRA for `key`; a fresh id once the previous one was retired."""
        if key not in self._ids:
            target = LoraTarget(name, next(self._new_id), path)
            self._ids[key], self._live[target.int_id] = target, key
        return self._ids[key]

    def single(self, patch: PatchLike) -> LoraTarget:
        return self._target((patch.name, patch.sha256), patch.name, patch.path)

    async def for_patches(self, patches: Sequence[PatchLike]) -> LoraTarget | None:
        """The LoRA serving exactly `patches` (sorted by name): none, the patch, or a stack.
        Take its lease (`acquire`/`lease`) with no await in between."""
        if not patches:
            return None
        for patch in patches:
            if patch.name in self.damaged:
                raise PatchUnavailable(
                    f"safety patch '{patch.name}' cannot be served: {self.damaged[patch.name]}"
                )
        if len(patches) == 1 and not patches[0].meta.get("serve_folded"):
            return self.single(patches[0])
        key = "+".join(p.name for p in patches)
        rank = sum(p.rank for p in patches)
        if rank > self.max_rank:
            raise RankTooLarge(
                f"stacking {key} needs LoRA rank {rank}, above the engine's max_lora_rank "
                f"{self.max_rank}",
                param="safety_patches",
            )
        disk_name = combined_name([p.name for p in patches], [p.sha256 for p in patches])
        cached = self._stacked.get(key)
        if cached is not None and cached.path.name == disk_name:
            self._stacked.move_to_end(key)
            return cached
        deletions = [self._deletions[p.name] for p in patches]
        try:
            await self._build(disk_name, patches)
        except DomainError:
            self._refuse_deleted(patches, deletions)  # the likelier cause of a failed build
            raise
        self._refuse_deleted(patches, deletions)
        target = self._target((disk_name, disk_name), key, self.stack_dir / disk_name)
        replaced = self._stacked.get(key)
        if replaced is not None and replaced != target:  # same patches, other weights
            self.retire(replaced)
        self._stacked[key] = target
        while len(self._stacked) > self.max_stacked:
            # Unloaded from the engine, files kept: a request that resolved this stack but has
            # not started yet can still load it from disk.
            self.retire(self._stacked.popitem(last=False)[1])
            self.on_event("evicted")
        return target

    def _refuse_deleted(self, patches: Sequence[PatchLike], deletions: list[int]) -> None:
        """PatchNotFound if one of `patches` was deleted since `deletions` was counted: a stack
        built across a delete must not become resolvable."""
        for patch, count in zip(patches, deletions, strict=True):
            if self._deletions[patch.name] != count:
                raise PatchNotFound(
                    f"safety patch '{patch.name}' was deleted", param="safety_patches"
                )

    async def _build(self, disk_name: str, patches: Sequence[PatchLike]) -> None:
        """Build the stack's directory unless it exists; one build per directory at a time (the
        lock lives while anyone waits on it, so a third caller cannot start a parallel build)."""
        out_dir = self.stack_dir / disk_name
        lock = self._build_locks.setdefault(disk_name, asyncio.Lock())
        self._building[disk_name] += 1
        try:
            async with lock:
                if not (out_dir / WEIGHTS_FILE).is_file():
                    await asyncio.to_thread(combine_adapters, [p.path for p in patches], out_dir)
                    self.on_event("stacked")
        except StackingError as exc:
            raise Unstackable(
                f"cannot stack {', '.join(p.name for p in patches)}: {exc}",
                param="safety_patches",
            ) from exc
        except OSError as exc:
            raise storage_error(exc, "building the stacked adapter") from exc
        finally:
            self._building[disk_name] -= 1
            if not self._building[disk_name]:
                del self._building[disk_name], self._build_locks[disk_name]

    # --- leases ----------------------------------------------------------------------
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
        int_id = target.int_id
        if int_id in self._unloaded:  # resolved before its retirement, leased after its unload:
            self._unloaded.discard(int_id)  # the engine loads it again, so unload it again
            self._retired[int_id] = (target, False)
        if int_id not in self._used:
            self._used.add(int_id)
            self.on_event("loaded")
        self._leases[int_id] = self._leases.get(int_id, 0) + 1
        held = [True]

        def release() -> None:
            if not held[0]:
                return
            held[0] = False
            self._leases[int_id] -= 1
            if not self._leases[int_id] and int_id in self._retired:
                self._schedule_unload()

        return release

    def leases_held(self) -> int:
        """Requests in flight that hold a LoRA (0 when idle: nothing leaked)."""
        return sum(self._leases.values())

    def leases(self) -> dict[int, int]:
        """lora_int_id -> leases held now (for metrics and leak checks)."""
        return {int_id: n for int_id, n in self._leases.items() if n}

    def pending_unloads(self) -> list[LoraTarget]:
        """Retired LoRAs still in the engine (leased, or their unload has not run yet)."""
        return [target for target, _ in self._retired.values()]

    # --- retiring --------------------------------------------------------------------
    def retire(self, target: LoraTarget, remove_files: bool = False) -> None:
        """Never serve `target` to a new request again; unload it (and delete its files if
        `remove_files`) once no lease holds it. Idempotent."""
        key = self._live.pop(target.int_id, None)
        if key is not None:
            del self._ids[key]
        for stack_key in [k for k, t in self._stacked.items() if t.int_id == target.int_id]:
            del self._stacked[stack_key]
        if target.int_id in self._unloaded:
            return
        earlier = self._retired.get(target.int_id)
        self._retired[target.int_id] = (target, remove_files or bool(earlier and earlier[1]))
        self._schedule_unload()

    def evict_stacks(self) -> int:
        """Retire every cached stack (files kept: the next request rebuilds nothing)."""
        stacks = list(self._stacked.values())
        for target in stacks:
            self.retire(target)
            self.on_event("evicted")
        return len(stacks)

    def retire_patch(self, patch: PatchLike, remove_files: bool = False) -> None:
        """A deleted patch: retire it and every cached stack that contains it."""
        self._deletions[patch.name] += 1
        self.damaged.pop(patch.name, None)  # a later registration under the name is checked anew
        for key in [k for k in self._stacked if patch.name in k.split("+")]:
            self.retire(self._stacked[key], remove_files=True)
        key = (patch.name, patch.sha256)
        if key in self._ids:
            self.retire(self._ids[key], remove_files)
        elif remove_files:  # never served: nothing to unload, only its files
            remove_dir(patch.path)

    def live_targets(self) -> list[LoraTarget]:
        """The LoRAs new requests may still be given (patches and stacks not retired)."""
        return list(self._ids.values())

    def is_live(self, target: LoraTarget) -> bool:
        """Whether `target` may still be served to new requests (not retired)."""
        return target.int_id in self._live
