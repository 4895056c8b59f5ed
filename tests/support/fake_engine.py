"""A deterministic stand-in for the engine, for HTTP-layer unit tests only.

Output depends on the prompt and on which LoRA serves the request, so tests can see which
patches reached the engine; `calls` records every request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from app.engine.types import GenerationChunk, LoraTarget, SamplingSpec


class FakeEngine:
    def __init__(self, token_delay: float = 0.0, start_delay: float = 0.0) -> None:
        self.token_delay = token_delay
        self.start_delay = start_delay
        self.ready = False
        self.calls: list[tuple[list[int], SamplingSpec, LoraTarget | None]] = []
        self.loaded: dict[int, LoraTarget] = {}
        self.pinned: set[int] = set()
        self.aborted: list[str] = []

    @property
    def is_ready(self) -> bool:
        return self.ready

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        self.ready = True

    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        request_id: str,
        lora: LoraTarget | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        self.calls.append((prompt_token_ids, sampling, lora))
        tag = lora.name if lora else "base"
        for i in range(sampling.max_tokens):
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            last = i == sampling.max_tokens - 1
            yield GenerationChunk(
                text=f"{tag}:{i} ",
                token_ids=[i],
                finish_reason="length" if last else None,
                prompt_tokens=len(prompt_token_ids),
                completion_tokens=i + 1,
            )

    async def add_lora(self, lora: LoraTarget) -> None:
        self.loaded[lora.int_id] = lora

    async def remove_lora(self, lora: LoraTarget) -> None:
        self.loaded.pop(lora.int_id, None)
        self.pinned.discard(lora.int_id)

    async def pin_lora(self, lora: LoraTarget) -> None:
        self.loaded[lora.int_id] = lora
        self.pinned.add(lora.int_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def shutdown(self) -> None:
        self.ready = False
