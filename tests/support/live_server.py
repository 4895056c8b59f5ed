"""Start `safepatch serve` as a real process (real uvicorn + real vLLM) and wait for /ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import ADMIN, ADMIN_TOKEN


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    process: subprocess.Popen
    base_url: str
    log_path: Path

    def client(self, timeout: float = 300.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)

    def tenant_key(self, tenant_id: str, policy: dict) -> str:
        """Create (or reset) a tenant with this policy and return a fresh key."""
        with self.client() as http:
            if http.get(f"/admin/tenants/{tenant_id}", headers=ADMIN).status_code == 404:
                http.post(
                    "/admin/tenants", headers=ADMIN, json={"id": tenant_id, "policy": policy}
                ).raise_for_status()
            else:
                http.put(
                    f"/admin/tenants/{tenant_id}/policy", headers=ADMIN, json=policy
                ).raise_for_status()
            response = http.post(f"/admin/tenants/{tenant_id}/keys", headers=ADMIN)
            response.raise_for_status()
            return response.json()["key"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_server(
    root: Path, *, model: Path | None, adapters: Path, timeout: float = 600, **env_overrides: str
) -> LiveServer:
    port = free_port()
    env = {
        **os.environ,
        "SAFEPATCH_PORT": str(port),
        "SAFEPATCH_HOST": "127.0.0.1",
        "SAFEPATCH_ADAPTERS_DIR": str(adapters),
        "SAFEPATCH_CACHE_DIR": os.environ.get("SAFEPATCH_TEST_CACHE_DIR", str(root / "cache")),
        "SAFEPATCH_DATABASE_URL": f"sqlite:///{root / 'safepatch.db'}",
        "SAFEPATCH_ADMIN_TOKEN": ADMIN_TOKEN,
        "SAFEPATCH_MAX_MODEL_LEN": "256",
        "SAFEPATCH_MAX_LORA_RANK": "32",
        "SAFEPATCH_MAX_LORAS": "4",
        "SAFEPATCH_MAX_NUM_SEQS": "16",
        **env_overrides,
    }
    if model is not None:
        env["SAFEPATCH_MODEL"] = str(model)
    log_path = root / "server.log"
    command = [str(Path(sys.executable).parent / "safepatch"), "serve"]
    process = spawn(command, env, log_path)
    server = LiveServer(process, f"http://127.0.0.1:{port}", log_path)
    wait_ready(process, f"{server.base_url}/ready", log_path, timeout, stop=server.stop)
    return server


def spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `command` in its own session (so a stop can signal its whole group), its output
    (stdout and stderr) going to `log_path`."""
    return subprocess.Popen(
        command,
        env=env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def chat(http: Any, key: str, model: str, prompt: str, max_tokens: int, **extra: Any) -> Any:
    """A greedy chat completion through `http` (an httpx client, sync or async: for an async
    one, await the result); `headers` in `extra` are sent beside the key."""
    headers = {"Authorization": f"Bearer {key}", **(extra.pop("headers", None) or {})}
    body = {
        "model": model,
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
        **extra,
    }
    return http.post("/v1/chat/completions", headers=headers, json=body)


def wait_ready(
    process: subprocess.Popen, url: str, log_path: Path, timeout: float, stop: Callable[[], None]
) -> None:
    """Until `url` answers 200; a process that exits or never gets there fails with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop()
    raise RuntimeError(f"server not ready in {timeout}s:\n{log_path.read_text()[-4000:]}")
