"""Engine-neutral request/response types: the API layer never imports vLLM."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA adapter as the engine sees it: a stable int id per (name, weights)."""

    name: str
    int_id: int
    path: Path


@dataclass
class GenerationChunk:
    """A streamed piece of one request's output (deltas), with running token counts."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class EngineClient(Protocol):
    """What the serving layer needs from an engine."""

    @property
    def is_ready(self) -> bool: ...

    def generate(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        request_id: str,
        lora: LoraTarget | None = None,
    ) -> AsyncIterator[GenerationChunk]: ...

    async def add_lora(self, lora: LoraTarget) -> None: ...

    async def remove_lora(self, lora: LoraTarget) -> None: ...

    async def pin_lora(self, lora: LoraTarget) -> None: ...

    async def abort(self, request_id: str) -> None: ...

    async def shutdown(self) -> None: ...
