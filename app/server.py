"""Runs the app under uvicorn with a graceful drain: on SIGTERM/SIGINT `/ready` turns 503,
the listener closes, in-flight requests (streams included) finish for up to
`drain_timeout_s`, then the lifespan shuts the engine down."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.config import Settings
from app.observability.logging import configure_logging


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = getattr(self._app.state, "safepatch", None)
        if state is not None:
            state.draining = True
        super().handle_exit(sig, frame)


def run_server(app: FastAPI, settings: Settings) -> None:
    configure_logging(settings.log_json, settings.log_level)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
        access_log=False,
    )
    server = DrainingServer(config, app)
    # An engine that cannot start ends the process instead of idling unready: as if SIGTERM
    # came, which uvicorn re-raises after shutdown, so the exit status is non-zero.
    app.state.on_fatal = lambda: server.handle_exit(signal.SIGTERM, None)
    app.state.uvicorn_server = server  # vLLM's engine-error handler stops it, too
    server.run()
