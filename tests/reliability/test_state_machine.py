"""Generated interleavings of the registry and serving targets (issue 17).

A Hypothesis state machine drives a real PatchRegistry (SQLite, a store on disk, real stacking)
over a RecordingEngine whose LoRA calls yield and sometimes fail. Async rules (delete, pin,
resolve, start a request) only create tasks; `advance` runs the event loop a few turns and
`settle` runs it dry, so awaits of different operations really interleave. After every step:
no exception escaped, leased LoRAs are loaded, no deleted patch is resolvable, every LoRA in
the engine is live, leased or queued for unloading; after `settle` also: every retired LoRA
without a lease is unloaded, and the database, the engine and the store agree.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from app.constants import CONFIG_FILE, WEIGHTS_FILE
from app.db import open_database
from app.engine.types import LoraTarget
from app.errors import Unavailable, api_error
from app.exceptions import AlreadyExists, DomainError, PatchNotFound
from app.patches.registry import PatchRegistry
from app.snapshot import Catalog
from tests.reliability.engine import RecordingEngine

NAMES = ("p0", "p1", "p2", "p3")
SOURCES = ("alpha", "beta", "gamma")  # tests/conftest.py PATCH_SPECS: ranks 4, 8, 4
SETTLE_TIMEOUT_S = 20.0  # everything in flight ends within this (stack builds take ms)


class RegistryMachine(RuleBasedStateMachine):
    model_dir: Path  # set by the test below
    library: Path
    root: Path

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(dir=self.root))
        self.store = self.dir / "adapters"
        self.store.mkdir()
        self.database = open_database(f"sqlite:///{self.dir / 'safepatch.db'}")
        # add_lora never fails here: it stands for vLLM's on-demand load, which a running
        # request repeats at its next step (only unpin's warm-up reload calls it)
        self.engine = RecordingEngine(yields=2, fail_ops=("remove", "pin"))
        self.registry = PatchRegistry(
            self.database,
            engine=self.engine,
            catalog=Catalog(self.database),
            store_dir=self.store,
            cache_dir=self.dir / "cache",
            model_dir=self.model_dir,
            max_rank=32,
            max_bytes=10_000_000,
            max_stacked=2,  # small, so that stacks get evicted by the LRU too
        )
        self.targets = self.registry.targets
        self.targets.retry_s = 0.0
        self.loop = asyncio.new_event_loop()
        self.escaped: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.escaped.append(context))
        self.tasks: list[asyncio.Task[Any]] = []
        self.deleting: list[tuple[str, asyncio.Task[Any]]] = []  # deletes in flight
        self.open: list[tuple[LoraTarget | None, Any]] = []  # requests holding a lease

    # --- rules -----------------------------------------------------------------------
    @initialize(seed=st.integers(0, 2**16), fail_rate=st.sampled_from([0.0, 0.25]))
    def faults(self, seed: int, fail_rate: float) -> None:
        self.engine.rng = random.Random(seed)
        self.engine.fail_rate = fail_rate

    @rule(name=st.sampled_from(NAMES), source=st.sampled_from(SOURCES))
    def register(self, name: str, source: str) -> None:
        active = self.registry.find(name) is not None
        files = self.library / source
        try:
            self.registry.register_upload(
                name, (files / CONFIG_FILE).read_bytes(), (files / WEIGHTS_FILE).read_bytes(), "sm"
            )
        except AlreadyExists:  # registered, or its deleted files wait for a lease to end
            assert active or (self.store / name).exists()
            return
        assert not active

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        (name,) = self._names(data, 1, 1)
        self._spawn(self.registry.delete(name, "sm"))
        self.deleting.append((name, self.tasks[-1]))

    @rule(data=st.data(), pinned=st.booleans())
    def pin(self, data: st.DataObject, pinned: bool) -> None:
        (name,) = self._names(data, 1, 1)
        self._spawn(self.registry.set_pinned(name, pinned, "sm"))

    @rule(data=st.data())
    def resolve(self, data: st.DataObject) -> None:
        self._spawn(self.registry.lora_for(self._names(data, 1, 3)))

    @rule(data=st.data())
    def start_request(self, data: st.DataObject) -> None:
        self._spawn(self._request(self._names(data, 0, 3)))

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def finish_request(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.open) - 1), label="request")
        _, release = self.open.pop(index)
        release()

    @rule()
    def evict_stacks(self) -> None:
        self.targets.evict_stacks()

    @rule(turns=st.integers(1, 6))
    def advance(self, turns: int) -> None:
        self.loop.run_until_complete(self._turns(turns))

    @rule()
    def settle(self) -> None:
        self._settle()

    async def _request(self, names: list[str]) -> None:
        target = await self.registry.lora_for(names)
        release = self.targets.acquire(target)  # no await since resolving: the contract
        self.engine.serve(target)
        self.open.append((target, release))

    # --- invariants after every step -------------------------------------------------
    @invariant()
    def no_exception_escapes(self) -> None:
        for task in [t for t in self.tasks if t.done()]:
            self.tasks.remove(task)
            error = task.exception()
            if error is None:
                continue
            api = api_error(error) if isinstance(error, DomainError) else None
            allowed = api is not None and (
                api.status_code < 500
                or (isinstance(api, Unavailable) and self.engine.fail_rate > 0)
            )
            assert allowed, f"{type(error).__name__}: {error}"
        assert not self.escaped, self.escaped

    @invariant()
    def leased_loras_are_loaded(self) -> None:
        """Unless an engine call on it is in flight: unpin unloads and reloads a pinned LoRA
        (vLLM has no unpin), and a running request reloads it at its next step meanwhile."""
        for target, _ in self.open:
            if target is not None and not self.engine.busy[target.int_id]:
                assert target.int_id in self.engine.loaded, target

    @invariant()
    def deleted_patches_are_not_resolvable(self) -> None:
        active = {r.name for r in self.registry.list()}
        # a delete in flight: committed (the snapshot shows it) before its coroutine resumes
        # to retire the LoRA; no request can resolve it meanwhile (checked below)
        in_flight = {name for name, task in self.deleting if not task.done()}
        for target in self.targets.live_targets():
            assert set(target.name.split("+")) <= active | in_flight, target
        for name in set(NAMES) - active:
            resolving = self.registry.lora_for([name])  # synchronous for a missing patch
            with pytest.raises(PatchNotFound):
                resolving.send(None)

    @invariant()
    def every_lora_in_the_engine_is_live_leased_or_queued(self) -> None:
        allowed = self._live() | set(self.targets.leases())
        allowed |= {t.int_id for t in self.targets.pending_unloads()}
        assert set(self.engine.loaded) <= allowed
        assert self.engine.pinned <= set(self.engine.loaded)

    # --- settling --------------------------------------------------------------------
    def _settle(self) -> None:
        """Run every task to its end, then one unload pass with no faults; then check what
        must hold once nothing is in flight."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while pending := [t for t in asyncio.all_tasks(self.loop) if not t.done()]:
            assert time.monotonic() < deadline, f"tasks never finished (a hang): {pending}"
            self.loop.run_until_complete(asyncio.wait(pending, timeout=1))
        fail_rate, self.engine.fail_rate = self.engine.fail_rate, 0.0
        self.loop.run_until_complete(self.targets.unload_retired())
        self.engine.fail_rate = fail_rate
        self.no_exception_escapes()
        leased = set(self.targets.leases())
        assert set(self.engine.loaded) <= self._live() | leased, "a retired LoRA stayed loaded"
        assert {t.int_id for t in self.targets.pending_unloads()} <= leased
        records = self.registry.list()
        pinned_rows = {r.name for r in records if r.pinned}
        pinned_engine = {
            t.name for t in self.targets.live_targets() if t.int_id in self.engine.pinned
        }
        assert pinned_rows == pinned_engine, "database and engine disagree on pins"
        on_disk = {p.name for p in self.store.iterdir()}
        held = {t.name for t in self.targets.pending_unloads()}
        assert {r.name for r in records} <= on_disk
        assert on_disk <= {r.name for r in records} | held, "files of a deleted patch stayed"

    def teardown(self) -> None:
        try:
            for _, release in self.open:
                release()
            self.open.clear()
            self._settle()
        finally:
            self.loop.close()
            self.database.dispose()
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- helpers ---------------------------------------------------------------------
    def _names(self, data: st.DataObject, least: int, most: int) -> list[str]:
        """Patch names from the fixed pool. Not drawn from the registry's current list: that
        follows a snapshot refreshed in the background, and Hypothesis needs draws that do not
        depend on timing to replay and shrink a case."""
        names = st.lists(st.sampled_from(NAMES), min_size=least, max_size=most, unique=True)
        return data.draw(names, label="names")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.tasks.append(self.loop.create_task(coro))

    def _live(self) -> set[int]:
        return {t.int_id for t in self.targets.live_targets()}

    @staticmethod
    async def _turns(turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)


def test_registry_and_targets_under_generated_interleavings(
    tiny_model: Path, patch_library: Path, tmp_path: Path
) -> None:
    RegistryMachine.model_dir = tiny_model
    RegistryMachine.library = patch_library
    RegistryMachine.root = tmp_path
    run_state_machine_as_test(
        RegistryMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
