"""A fake engine for the reliability tests: records every LoRA load/unload/pin, yields to the
event loop inside each call (as vLLM's do: they cross a process boundary) and can be told to
fail some of them."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable

from app.engine.types import LoraTarget
from tests.support.fake_engine import FakeEngine


class EngineFault(RuntimeError):
    """What the recording engine raises for an injected failure."""


class RecordingEngine(FakeEngine):
    """`yields`: event-loop turns taken inside each LoRA call (0: none, like FakeEngine).
    `fail_rate`: probability that a LoRA call named in `fail_ops` raises EngineFault (drawn
    from `rng`), before any change. `log` holds ('add'|'remove'|'pin'|'serve', int_id) for
    every call that took effect."""

    def __init__(
        self,
        *,
        yields: int = 2,
        fail_rate: float = 0.0,
        fail_ops: tuple[str, ...] = ("add", "remove", "pin"),
        rng: random.Random | None = None,
        token_delay: float = 0.0,
    ) -> None:
        super().__init__(token_delay=token_delay)
        self.ready = True
        self.yields = yields
        self.fail_rate = fail_rate
        self.fail_ops = fail_ops
        self.rng = rng or random.Random(0)
        self.log: list[tuple[str, int]] = []
        self.in_call = 0  # LoRA calls in progress right now
        self.busy: Counter[int] = Counter()  # lora_int_id -> its calls in progress
        self.max_in_call = 0  # the most that were ever in progress at once

    async def _call(self, op: str, lora: LoraTarget, effect: Callable[[], None]) -> None:
        """Yield, maybe fail, then apply `effect`; `busy` covers the whole call."""
        self.in_call += 1
        self.busy[lora.int_id] += 1
        self.max_in_call = max(self.max_in_call, self.in_call)
        try:
            for _ in range(self.yields):
                await asyncio.sleep(0)
            if op in self.fail_ops and self.fail_rate and self.rng.random() < self.fail_rate:
                raise EngineFault(f"injected {op} failure for LoRA {lora.int_id}")
            effect()
            self.log.append((op, lora.int_id))
        finally:
            self.in_call -= 1
            self.busy[lora.int_id] -= 1

    def serve(self, lora: LoraTarget | None) -> None:
        """What a request does before it reaches the engine (SafePatch's front calls the
        idempotent add_lora): its LoRA is loaded, here at once."""
        if lora is not None:
            self.loaded[lora.int_id] = lora
            self.log.append(("serve", lora.int_id))

    async def add_lora(self, lora: LoraTarget) -> None:
        def load() -> None:
            self.loaded[lora.int_id] = lora

        await self._call("add", lora, load)

    async def remove_lora(self, lora: LoraTarget) -> None:
        def unload() -> None:
            self.loaded.pop(lora.int_id, None)  # vLLM: removing an absent LoRA is a no-op
            self.pinned.discard(lora.int_id)

        await self._call("remove", lora, unload)

    async def pin_lora(self, lora: LoraTarget) -> None:
        def pin() -> None:
            self.loaded[lora.int_id] = lora
            self.pinned.add(lora.int_id)

        await self._call("pin", lora, pin)
