"""The real engine: vLLM's `AsyncLLM` with vLLM's own OpenAI app over it.

The engine and app are built from `vllm serve` flags (`app.engine.args.serve_argv`), so every
`vllm serve` option has a SafePatch equivalent. SafePatch sits in front of the app
(`app.serving.front`) and manages which LoRAs vLLM's serving layer knows: a `LoraTarget` is
served under the name `served_name(target)`. Server internals used here live in
`app.engine.vllm_compat`; the rest (`AsyncEngineArgs`, `AsyncLLM`) is vLLM's public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from app.config import Settings
from app.engine import vllm_compat
from app.engine.args import prepare_environment, serve_argv
from app.engine.types import LoraTarget, served_name

logger = logging.getLogger(__name__)


class VllmEngine:
    def __init__(self, settings: Settings, model_dir: Path) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.argv = serve_argv(settings, model_dir)
        self._llm: Any = None
        self._app: Any = None
        self._lifespan = contextlib.AsyncExitStack()
        self._vllm_ids: dict[int, int] = {}  # target int_id -> vLLM's lora_int_id
        self._loading: dict[int, asyncio.Lock] = {}

    @property
    def is_ready(self) -> bool:
        return self._app is not None and not self.errored

    @property
    def errored(self) -> bool:
        """The engine process died (OOM kill, crash): nothing can be served any more."""
        return self._llm is not None and bool(self._llm.errored)

    @property
    def requests_in_flight(self) -> int:
        return 0 if self._llm is None else int(self._llm.get_num_unfinished_requests())

    @property
    def asgi(self) -> Any:
        return self._app

    async def start(self) -> None:
        """Build the engine off the event loop so /health answers while it loads (~35 s)."""
        prepare_environment(self.settings)
        args = vllm_compat.parse_serve_args(self.argv)
        self._llm = await asyncio.to_thread(self._build, args)
        app = await vllm_compat.build_openai_app(self._llm, args)
        await self._lifespan.enter_async_context(app.router.lifespan_context(app))
        self._app = app
        logger.info("engine ready: %s", self.model_dir)

    @staticmethod
    def _build(args: Any) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args = AsyncEngineArgs.from_cli_args(args)
        return AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)

    def attach_server(self, server: Any) -> None:
        if self._app is not None:
            vllm_compat.attach_server(self._app, server)

    async def add_lora(self, lora: LoraTarget) -> None:
        """Make `lora` servable (idempotent; concurrent callers wait for one load)."""
        if lora.int_id in self._vllm_ids:
            return
        lock = self._loading.setdefault(lora.int_id, asyncio.Lock())
        async with lock:
            if lora.int_id not in self._vllm_ids:
                self._vllm_ids[lora.int_id] = await vllm_compat.load_lora(
                    self._app, served_name(lora), str(lora.path)
                )
        self._loading.pop(lora.int_id, None)

    async def remove_lora(self, lora: LoraTarget) -> None:
        vllm_id = self._vllm_ids.pop(lora.int_id, None)
        if vllm_id is None:
            return
        await vllm_compat.unload_lora(self._app, served_name(lora))
        await self._llm.remove_lora(vllm_id)

    async def pin_lora(self, lora: LoraTarget) -> None:
        await self.add_lora(lora)
        await self._llm.pin_lora(self._vllm_ids[lora.int_id])

    async def base_model_cards(self) -> list[dict[str, Any]]:
        return await vllm_compat.base_model_cards(self._app)

    async def shutdown(self) -> None:
        if self._app is not None:
            self._app = None
            with contextlib.suppress(Exception):
                await self._lifespan.aclose()
        if self._llm is not None:
            llm, self._llm = self._llm, None
            llm.shutdown()
