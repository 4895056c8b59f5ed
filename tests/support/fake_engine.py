"""A deterministic stand-in for the engine and its OpenAI app, for HTTP-layer unit tests only
(the real one is vLLM's, exercised by tests/e2e).

Its app answers `/v1/chat/completions`, `/v1/completions` (streamed or not) and `/tokenize`
in vLLM's shapes. Output depends on which LoRA the request names, so tests can see which
patches reached the engine: `calls` records every generation request's body and LoRA. With
any LoRA, a prompt containing "[refuse]" is answered "I'm sorry:0 I'm sorry:1 ...".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.engine.types import LoraTarget, served_name

BASE_CARD = {"object": "model", "owned_by": "vllm", "max_model_len": 256, "permission": []}


def vllm_error(message: str, status: int, kind: str = "BadRequestError") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


class FakeEngine:
    def __init__(
        self, token_delay: float = 0.0, start_delay: float = 0.0, base_name: str = "tiny"
    ) -> None:
        self.token_delay = token_delay
        self.start_delay = start_delay
        self.base_name = base_name
        self.ready = False
        self.dead = False
        self.calls: list[tuple[dict[str, Any], LoraTarget | None]] = []
        self.loaded: dict[int, LoraTarget] = {}
        self.pinned: set[int] = set()
        self.cancelled: list[str] = []
        self.in_flight = 0  # generation requests being answered now
        self.most_in_flight = 0
        self.fail_with: Exception | None = None  # raised inside the app on the next request
        self.app = self._build_app()

    @property
    def requests_in_flight(self) -> int:
        return self.in_flight

    @property
    def is_ready(self) -> bool:
        return self.ready and not self.dead

    @property
    def errored(self) -> bool:
        return self.dead

    @property
    def asgi(self) -> FastAPI | None:
        return self.app if self.ready else None

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        self.ready = True

    def attach_server(self, server: Any) -> None:
        pass

    async def add_lora(self, lora: LoraTarget) -> None:
        self.loaded[lora.int_id] = lora

    async def remove_lora(self, lora: LoraTarget) -> None:
        self.loaded.pop(lora.int_id, None)
        self.pinned.discard(lora.int_id)

    async def pin_lora(self, lora: LoraTarget) -> None:
        self.loaded[lora.int_id] = lora
        self.pinned.add(lora.int_id)

    async def base_model_cards(self) -> list[dict[str, Any]]:
        card = {**BASE_CARD, "id": self.base_name, "root": self.base_name, "parent": None}
        return [{**card, "created": int(time.time())}]

    async def shutdown(self) -> None:
        self.ready = False

    # --- the fake OpenAI app -------------------------------------------------------------
    def _lora(self, model: str) -> LoraTarget | None | str:
        if model == self.base_name:
            return None
        for lora in self.loaded.values():
            if served_name(lora) == model:
                return lora
        return "unknown"

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        @app.post("/v1/completions")
        async def generate(request: Request):
            if self.fail_with is not None:
                error, self.fail_with = self.fail_with, None
                raise error
            try:  # vLLM validates requests: a 400 for what it cannot take
                return await answer(request)
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                return vllm_error(f"invalid request: {exc}", 400)

        async def answer(request: Request):
            body = await request.json()
            lora = self._lora(body.get("model", self.base_name))
            if lora == "unknown":
                return vllm_error(f"The model `{body.get('model')}` does not exist.", 404)
            if body.get("temperature", 1.0) < 0:
                return vllm_error("temperature must be non-negative", 400)
            self.calls.append((body, lora))
            chat = request.url.path.endswith("chat/completions")
            tag = lora.name if lora else "base"
            if lora and "[refuse]" in json.dumps(body.get("messages") or body.get("prompt")):
                tag = "I'm sorry"  # any patch refuses these prompts
            max_tokens = int(body.get("max_tokens") or 4)
            if not 0 < max_tokens <= 256:
                raise ValueError("max_tokens out of range")
            if body.get("stream"):
                return StreamingResponse(
                    self._events(body, chat, tag, max_tokens, request),
                    media_type="text/event-stream",
                )
            with self._generating():
                await asyncio.sleep(self.token_delay * max_tokens)
            text = "".join(f"{tag}:{i} " for i in range(max_tokens))
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            usage = {"prompt_tokens": 3, "completion_tokens": max_tokens}
            usage["total_tokens"] = 3 + max_tokens
            return {
                "id": "fake",
                "object": "chat.completion" if chat else "text_completion",
                "model": body["model"],
                "choices": [{"index": 0, **choice, "finish_reason": "length"}],
                "usage": usage,
            }

        @app.post("/tokenize")
        async def tokenize(request: Request):
            try:
                body = await request.json()
                assert isinstance(body, dict)
            except (ValueError, AssertionError):
                return vllm_error("the body must be a JSON object", 400)
            tokens = list(range(len(str(body.get("prompt", "")).split())))
            return {"tokens": tokens, "count": len(tokens), "max_model_len": 256}

        return app

    @contextlib.contextmanager
    def _generating(self) -> Iterator[None]:
        """Count a request as in flight in the engine while its tokens are being made."""
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _events(
        self, body: dict[str, Any], chat: bool, tag: str, max_tokens: int, request: Request
    ) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        try:
            with self._generating():
                for i in range(max_tokens):
                    if self.token_delay:
                        await asyncio.sleep(self.token_delay)
                    piece = f"{tag}:{i} "
                    choice = {"delta": {"content": piece}} if chat else {"text": piece}
                    last = i == max_tokens - 1
                    chunk = {"id": "fake", "object": kind, "model": body["model"]}
                    chunk["choices"] = [
                        {"index": 0, **choice, "finish_reason": "length" if last else None}
                    ]
                    yield f"data: {json.dumps(chunk)}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 3, "completion_tokens": max_tokens}
                chunk = {"id": "fake", "object": kind, "model": body["model"], "choices": []}
                yield f"data: {json.dumps({**chunk, 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.cancelled.append(tag)
            raise
