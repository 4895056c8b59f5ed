"""Gated patches in serving: a short probe with every effective patch decides whether the
gated ones act (`app.patches.gate` holds the rule). The probe and the ungated request start
together; nothing of the ungated answer is sent before the decision."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from app.engine.types import served_name
from app.patches.gate import Probe
from app.serving.answer import answer, engine_app, lease
from app.serving.proxy import encode_json, forward
from app.state import AppState
from app.tenants.access import Resolved

# Request fields a probe leaves out: it is greedy, one choice, whole and short, plain text.
PROBE_DROPPED = {
    "max_completion_tokens",
    "min_tokens",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "echo",
    "best_of",
    "use_beam_search",
    "stop",
    "response_format",
    "structured_outputs",
    "seed",
}


async def gated_answer(
    state: AppState,
    request: Request,
    payload: dict[str, Any],
    requested: str,
    who: Resolved,
    probe: Probe,
) -> Response:
    """The probe and the ungated request start together, so a request the probe passes (most
    traffic) waits for no probe: nothing of the ungated answer is sent before the decision.
    If the probe fires, the ungated request is dropped (vLLM aborts it) and the patched one
    runs, reusing the probe's prefix from vLLM's LoRA-aware prefix cache."""
    kept = [p for p in who.patches if p not in probe.gated]
    records = {p: who.records[p] for p in kept}
    ungated = Resolved(
        who.tenant, kept, await state.registry.lora_of(list(records.values())), records
    )
    gates: dict[str, str] = {}
    decided: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    early = asyncio.create_task(
        answer(state, request, dict(payload), requested, ungated, gates, hold=decided)
    )
    early.add_done_callback(_retrieve)
    try:
        fired = await _probe(state, request, payload, who, probe)
    except BaseException:
        early.cancel()
        raise
    decision = "fired" if fired else "passed"
    for patch in probe.gated:
        state.metrics.gate_decisions.labels(patch, decision).inc()
    gates.update(dict.fromkeys(probe.gated, decision))
    if fired:
        early.cancel()
        return await answer(state, request, payload, requested, who, gates)
    request.state.patches = kept
    decided.set_result(None)
    return await early


async def _probe(
    state: AppState, request: Request, payload: dict[str, Any], who: Resolved, probe: Probe
) -> bool:
    """Whether the probe with every effective patch fires. It streams, and stops (vLLM aborts
    it) as soon as its opening decides: most benign answers after their first token. A probe
    that fails (a 4xx the real request will get too) counts as firing: fail closed."""
    body = {k: v for k, v in payload.items() if k not in PROBE_DROPPED}
    body.update(max_tokens=probe.probe_tokens, temperature=0, n=1, stream=True)
    body["model"] = served_name(who.lora) if who.lora else state.model_name
    release = await lease(state, who)
    reply = await forward(engine_app(state), request, encode_json(body), on_done=release)
    if reply.status_code != 200 or not isinstance(reply, StreamingResponse):
        return True
    reader = _ProbeReader(probe, _prompts_in(payload))
    events = reply.body_iterator
    pending = ""
    try:
        async for chunk in events:
            pending += chunk if isinstance(chunk, str) else bytes(chunk).decode()
            *complete, pending = pending.split("\n\n")
            for event in complete:
                reader.feed(event)
            verdict = reader.verdict()
            if verdict is not None:
                return verdict
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    return reader.fires()


class _ProbeReader:
    """The probe's text per choice (a completions request may hold several prompts, one
    choice each). It fires when any choice does; it passes early only once every prompt's
    choice can no longer fire."""

    def __init__(self, probe: Probe, prompts: int) -> None:
        self.probe = probe
        self.prompts = prompts
        self.texts: dict[int, str] = {}

    def feed(self, event: str) -> None:
        if not event.startswith("data: {"):
            return
        for choice in json.loads(event[6:]).get("choices") or []:
            piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            index = int(choice.get("index") or 0)
            self.texts[index] = self.texts.get(index, "") + piece

    def verdict(self) -> bool | None:
        verdicts = [self.probe.verdict(text) for text in self.texts.values()]
        if True in verdicts:
            return True
        everyone = len(self.texts) >= self.prompts and all(v is False for v in verdicts)
        return False if everyone else None

    def fires(self) -> bool:
        return any(self.probe.fires(text) for text in self.texts.values())


def _prompts_in(payload: dict[str, Any]) -> int:
    """How many prompts a request holds: a completions `prompt` may be a list of texts or of
    token-id lists (a flat list of ids is one prompt)."""
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        return len(prompt)
    return 1


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A dropped ungated answer's error is nobody's: read it so asyncio does not log it."""
    if not task.cancelled():
        task.exception()


def prefilled(payload: dict[str, Any]) -> bool:
    """A chat request that continues a final assistant message the caller wrote."""
    return (
        bool(payload.get("continue_final_message")) or payload.get("add_generation_prompt") is False
    )
