"""Graceful shutdown of a real uvicorn process: a stream in flight when SIGTERM arrives
finishes with every token, new callers are refused, then the engine shuts down and the process
exits cleanly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.support.api_client import BASE

REPO = Path(__file__).resolve().parents[2]
TOKENS = 60
TOKEN_DELAY = 0.05


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def log_lines(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if line.strip()]


@pytest.fixture
def server(tiny_model: Path, tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    settings = {
        "model": str(tiny_model),
        "host": "127.0.0.1",
        "port": port,
        "adapters_dir": str(tmp_path / "adapters"),
        "cache_dir": str(tmp_path / "cache"),
        "database_url": f"sqlite:///{tmp_path / 'safepatch.db'}",
        "admin_token": ADMIN_TOKEN,
        "dev_mode": True,
        "max_model_len": 256,
        "drain_timeout_s": 20,
        "log_json": True,
    }
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.fake_server",
                json.dumps(settings),
                str(TOKEN_DELAY),
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"server died:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server never ready:\n{log.read_text()}"
            try:
                if httpx.get(f"{server.url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_sigterm_lets_the_stream_in_flight_finish(server: Server) -> None:
    body = {
        "model": BASE,
        "max_tokens": TOKENS,
        "stream": True,
        "messages": [{"role": "user", "content": "count"}],
    }
    pieces: list[str] = []
    done = False
    refused_during_drain = None
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{server.url}/v1/chat/completions",
            json=body,
            headers={"X-Request-ID": "drain-rid"},
        ) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                done = True
                continue
            delta = json.loads(payload)["choices"][0]["delta"].get("content")
            if delta:
                pieces.append(delta)
            if len(pieces) == 5:
                server.process.send_signal(signal.SIGTERM)
            if len(pieces) == 15:  # draining by now: a new caller must not be served
                try:
                    ready = httpx.get(f"{server.url}/ready", timeout=2)
                    refused_during_drain = ready.status_code == 503
                except httpx.TransportError:
                    refused_during_drain = True
    assert done, "the stream ended without data: [DONE]"
    assert pieces == [f"base:{i} " for i in range(TOKENS)]
    assert refused_during_drain, "a new request was served as ready while draining"
    # uvicorn (>= 0.29) re-raises the signal it caught once the shutdown is complete, so a
    # clean exit is 0 or "terminated by SIGTERM" -- after the lifespan finished, as logged
    assert server.process.wait(30) in (0, -signal.SIGTERM)
    lines = server.log_lines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    messages = [e["message"] for e in entries]
    assert "fake engine shut down" in messages, lines
    assert messages[-2:] == [
        "Application shutdown complete.",
        f"Finished server process [{server.process.pid}]",
    ], messages[-3:]
    stream_log = [e for e in entries if e["request_id"] == "drain-rid"]
    assert stream_log and stream_log[0]["status"] == 200, lines
