"""A real uvicorn server (app.server.run_server, draining included) running the app over
FakeEngine, for tests that need a process and signals.

    python -m tests.support.fake_server '<Settings kwargs as JSON>' [token_delay]

Logs "fake engine shut down" when the lifespan shuts the engine down.
"""

from __future__ import annotations

import json
import logging
import sys

from app.config import Settings
from app.server import run_server
from tests.support.apps import build_app
from tests.support.fake_engine import FakeEngine

logger = logging.getLogger("tests.fake_server")


class LoggingFakeEngine(FakeEngine):
    async def shutdown(self) -> None:
        await super().shutdown()
        logger.warning("fake engine shut down")


def main(argv: list[str]) -> None:
    settings = Settings(**json.loads(argv[1]))
    engine = LoggingFakeEngine(token_delay=float(argv[2]) if len(argv) > 2 else 0.0)
    run_server(build_app(settings, engine)[0], settings)


if __name__ == "__main__":
    main(sys.argv)
