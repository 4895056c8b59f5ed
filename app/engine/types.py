"""Engine-neutral types: the API layer never imports vLLM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from starlette.types import ASGIApp


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA adapter as the engine sees it: a stable int id per (name, weights)."""

    name: str
    int_id: int
    path: Path


class EngineClient(Protocol):
    """What SafePatch needs from an engine: its OpenAI app, and control of its LoRAs."""

    @property
    def is_ready(self) -> bool: ...

    @property
    def errored(self) -> bool: ...

    @property
    def requests_in_flight(self) -> int:
        """Requests the engine is working on (0 when idle: nothing left behind)."""

    @property
    def asgi(self) -> ASGIApp | None:
        """The engine's OpenAI-compatible ASGI app (vLLM's own), None until started."""

    async def start(self) -> None: ...

    def attach_server(self, server: Any) -> None: ...

    async def add_lora(self, lora: LoraTarget) -> None:
        """Make `lora` servable under `served_name(lora)`; idempotent."""

    async def remove_lora(self, lora: LoraTarget) -> None: ...

    async def pin_lora(self, lora: LoraTarget) -> None: ...

    async def base_model_cards(self) -> list[dict[str, Any]]: ...

    async def shutdown(self) -> None: ...


def served_name(target: LoraTarget) -> str:
    """The engine's name for a target: unique per weights, so a re-registered patch never
    collides with the retiring one (responses show the client's own `model`)."""
    return f"{target.name}@{target.int_id}"
