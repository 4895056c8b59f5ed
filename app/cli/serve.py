"""`safepatch serve` and `safepatch convert-model`."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from app.config import Settings


def serve(
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="HF model directory; default: the embedded SmolLM2-135M-Instruct"),
    ] = None,
) -> None:
    """Serve the OpenAI-compatible API with per-request safety patches."""
    overrides = {
        k: v for k, v in {"host": host, "port": port, "model": model}.items() if v is not None
    }
    settings = Settings(**overrides)
    from app.main import create_app
    from app.model.default_model import resolve_model_dir
    from app.server import run_server

    logging.basicConfig(level=settings.log_level)
    # Convert the embedded model before the server starts, with progress on the terminal.
    settings = settings.model_copy(update={"model": str(resolve_model_dir(settings))})
    run_server(create_app(settings), settings)


def convert_model() -> None:
    """Convert the embedded SmolLM2 GGUF to a safetensors directory (idempotent)."""
    from app.model.default_model import ensure_default_model

    typer.echo(ensure_default_model(Settings().cache_dir))
