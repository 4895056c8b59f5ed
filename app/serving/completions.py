"""Chat and text completions over the engine: non-streaming and SSE streaming."""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.engine.types import EngineClient, GenerationChunk, LoraTarget, SamplingSpec
from app.errors import Unavailable
from app.observability.metrics import Metrics
from app.patches.registry import PatchRegistry
from app.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    SafePatchInfo,
    Usage,
    new_id,
    now,
)
from app.serving.prompts import PromptBuilder

APPLIED_HEADER = "X-SafePatch-Applied"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resolved:
    """Who asks and which patches serve them (already checked against the tenant policy)."""

    tenant: str
    patches: list[str]
    lora: LoraTarget | None


@dataclass
class _Result:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage


def _usage(chunk: GenerationChunk | None, prompt_len: int) -> Usage:
    completion = chunk.completion_tokens if chunk else 0
    return Usage(
        prompt_tokens=prompt_len, completion_tokens=completion, total_tokens=prompt_len + completion
    )


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


class CompletionServing:
    def __init__(
        self,
        engine: EngineClient,
        prompts: PromptBuilder,
        registry: PatchRegistry,
        metrics: Metrics,
        model_name: str,
        log_prompts: bool = False,
    ) -> None:
        self.log_prompts = log_prompts  # prompt text reaches the logs only when asked for
        self.engine = engine
        self.prompts = prompts
        self.registry = registry
        self.metrics = metrics
        self.model_name = model_name

    # --- public ----------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, who: Resolved, http: Request):
        ids = self.prompts.chat(req.messages)
        sampling = self._sampling(req, ids, req.max_completion_tokens or req.max_tokens)
        rid = new_id("chatcmpl")
        info = SafePatchInfo(applied_patches=who.patches)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream(
                self._chat_events(ids, sampling, who, rid, req.model, info, include_usage, http),
                who,
            )
        result = await self._collect(ids, sampling, who, rid)
        body = ChatCompletionResponse(
            id=rid,
            created=now(),
            model=req.model,
            usage=result.usage,
            safepatch=info,
            choices=[
                ChatChoice(
                    message=ChatMessageOut(content=result.text),
                    finish_reason=result.finish_reason,
                    token_ids=result.token_ids if req.return_token_ids else None,
                )
            ],
        )
        return self._json(body.model_dump(), who)

    async def complete(self, req: CompletionRequest, who: Resolved, http: Request):
        ids = self.prompts.completion(req.prompt)
        sampling = self._sampling(req, ids, req.max_tokens)
        rid = new_id("cmpl")
        info = SafePatchInfo(applied_patches=who.patches)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream(
                self._completion_events(
                    ids, sampling, who, rid, req.model, info, include_usage, http
                ),
                who,
            )
        result = await self._collect(ids, sampling, who, rid)
        body = CompletionResponse(
            id=rid,
            created=now(),
            model=req.model,
            usage=result.usage,
            safepatch=info,
            choices=[
                CompletionChoice(
                    text=result.text,
                    finish_reason=result.finish_reason,
                    token_ids=result.token_ids if req.return_token_ids else None,
                )
            ],
        )
        return self._json(body.model_dump(), who)

    # --- internals -------------------------------------------------------------------
    def _sampling(
        self, req: ChatCompletionRequest | CompletionRequest, ids: list[int], max_tokens: int | None
    ) -> SamplingSpec:
        if not self.engine.is_ready:
            raise Unavailable("the engine is still loading; retry shortly")
        return SamplingSpec(
            max_tokens=self.prompts.max_tokens(ids, max_tokens),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=tuple(req.stop or ()),
            ignore_eos=req.ignore_eos,
        )

    @staticmethod
    def _headers(who: Resolved) -> dict[str, str]:
        return {APPLIED_HEADER: ",".join(who.patches)}

    def _json(self, body: dict, who: Resolved) -> JSONResponse:
        return JSONResponse(body, headers=self._headers(who))

    def _stream(self, events: AsyncIterator[str], who: Resolved) -> StreamingResponse:
        # The LoRA is leased from here, not from when the body starts streaming: a patch
        # deleted between resolving and streaming must stay loaded for this request. Called
        # with no await since `who` was resolved, so no delete can slip in before it.
        release = self.registry.targets.acquire(who.lora)

        async def leased() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            finally:
                release()

        body = leased()
        weakref.finalize(body, release)  # a body never iterated (client gone) still releases
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers={**self._headers(who), "Cache-Control": "no-cache"},
        )

    async def _generate(
        self,
        ids: list[int],
        sampling: SamplingSpec,
        who: Resolved,
        rid: str,
        http: Request | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """The one path to the engine: aborts on disconnect, records token metrics. The caller
        holds the LoRA lease for the whole response (`_collect`, `_stream`)."""
        start, first, last = time.perf_counter(), None, None
        finished = False
        if self.log_prompts:
            logger.info(
                "prompt",
                extra={
                    "prompt": self.prompts.tokenizer.decode(ids),
                    "patches": ",".join(who.patches),
                },
            )
        try:
            async for chunk in self.engine.generate(ids, sampling, rid, who.lora):
                if first is None and chunk.token_ids:
                    first = time.perf_counter() - start
                last = chunk
                yield chunk
                if http is not None and await http.is_disconnected():
                    break
            finished = last is not None and last.finish_reason is not None
        finally:
            if not finished:
                await self.engine.abort(rid)
            self.metrics.observe_generation(
                who.tenant, who.patches, len(ids), last.completion_tokens if last else 0, first
            )

    async def _collect(
        self, ids: list[int], sampling: SamplingSpec, who: Resolved, rid: str
    ) -> _Result:
        parts, token_ids, last = [], [], None
        with self.registry.targets.lease(who.lora):  # taken before any await since resolving
            async for chunk in self._generate(ids, sampling, who, rid):
                parts.append(chunk.text)
                token_ids += chunk.token_ids
                last = chunk
        return _Result(
            "".join(parts), token_ids, last.finish_reason if last else None, _usage(last, len(ids))
        )

    async def _chat_events(
        self,
        ids: list[int],
        sampling: SamplingSpec,
        who: Resolved,
        rid: str,
        model: str,
        info: SafePatchInfo,
        include_usage: bool,
        http: Request,
    ) -> AsyncIterator[str]:
        created, last = now(), None

        def chunk(delta: DeltaMessage, finish: str | None = None, **extra) -> str:
            body = ChatCompletionChunk(
                id=rid,
                created=created,
                model=model,
                choices=[ChatChunkChoice(delta=delta, finish_reason=finish)],
                **extra,
            )
            return _sse(body.model_dump_json(exclude_none=True))

        yield chunk(DeltaMessage(role="assistant", content=""), safepatch=info)
        async for piece in self._generate(ids, sampling, who, rid, http):
            last = piece
            if piece.text or piece.finish_reason:
                yield chunk(DeltaMessage(content=piece.text), piece.finish_reason)
        if include_usage:
            usage = ChatCompletionChunk(
                id=rid, created=created, model=model, choices=[], usage=_usage(last, len(ids))
            )
            yield _sse(usage.model_dump_json(exclude_none=True))
        yield _sse("[DONE]")

    async def _completion_events(
        self,
        ids: list[int],
        sampling: SamplingSpec,
        who: Resolved,
        rid: str,
        model: str,
        info: SafePatchInfo,
        include_usage: bool,
        http: Request,
    ) -> AsyncIterator[str]:
        created, last, first = now(), None, True
        async for piece in self._generate(ids, sampling, who, rid, http):
            last = piece
            body = CompletionResponse(
                id=rid,
                created=created,
                model=model,
                safepatch=info if first else None,
                choices=[CompletionChoice(text=piece.text, finish_reason=piece.finish_reason)],
            )
            first = False
            yield _sse(body.model_dump_json(exclude_none=True))
        if include_usage:
            yield _sse(
                json.dumps(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(last, len(ids)).model_dump(),
                    }
                )
            )
        yield _sse("[DONE]")
