"""A streamed response holds its LoRA from the moment it is built, not from its first byte:
a patch deleted in between stays loaded until the stream ends, and a body that is never
iterated (the client left) still gives the lease back."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from app.engine.types import LoraTarget
from app.patches.targets import ServingTargets
from app.serving.completions import CompletionServing, Resolved


def _serving(tmp_path: Path) -> tuple[CompletionServing, ServingTargets, LoraTarget]:
    targets = ServingTargets(tmp_path / "stacks", max_rank=8)
    patch = SimpleNamespace(name="alpha", sha256="0" * 64, rank=4, path=tmp_path, meta={})
    target = targets.single(patch)
    registry: Any = SimpleNamespace(targets=targets)
    serving = CompletionServing(
        engine=Any, prompts=Any, registry=registry, metrics=Any, model_name="base"
    )
    return serving, targets, target


async def _events() -> AsyncIterator[str]:
    for i in range(3):
        yield f"data: {i}\n\n"


def test_lease_is_taken_when_the_stream_is_built_and_ends_with_it(tmp_path: Path) -> None:
    serving, targets, target = _serving(tmp_path)
    response = serving._stream(_events(), Resolved("t", ["alpha"], target))
    assert targets._leases[target.int_id] == 1  # before the first byte

    async def drain() -> list[str]:
        return [chunk async for chunk in response.body_iterator]

    assert len(asyncio.run(drain())) == 3
    assert targets._leases[target.int_id] == 0


def test_a_stream_never_iterated_still_releases(tmp_path: Path) -> None:
    serving, targets, target = _serving(tmp_path)
    response = serving._stream(_events(), Resolved("t", ["alpha"], target))
    assert targets._leases[target.int_id] == 1
    del response
    gc.collect()
    assert targets._leases[target.int_id] == 0


def test_release_is_idempotent_and_base_requests_hold_nothing(tmp_path: Path) -> None:
    _, targets, target = _serving(tmp_path)
    release = targets.acquire(target)
    other = targets.acquire(target)
    release()
    release()  # a second call must not end the other lease
    assert targets._leases[target.int_id] == 1
    other()
    assert targets._leases[target.int_id] == 0
    targets.acquire(None)()  # no LoRA: nothing to hold
