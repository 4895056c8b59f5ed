"""One settings object for the whole service (env vars `SAFEPATCH_*`, optional TOML file)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from app.db import default_replica_id

REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "safepatch"


class Settings(BaseSettings):
    """Service settings. Env: `SAFEPATCH_<FIELD>`; file: `SAFEPATCH_CONFIG_FILE` (TOML)."""

    model_config = SettingsConfigDict(env_prefix="SAFEPATCH_", extra="ignore")

    # --- model and engine -------------------------------------------------------------
    model: str | None = Field(
        default=None,
        description="HF model directory (safetensors). None: the embedded SmolLM2-135M-Instruct.",
    )
    served_model_name: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_loras: int = 4
    max_lora_rank: int = 16  # vLLM pads every LoRA to this: keep it tight on CPU
    max_cpu_loras: int = 16
    kv_cache_space_gib: int = 1  # CPU only: VLLM_CPU_KVCACHE_SPACE
    gpu_memory_utilization: float = 0.9  # GPU only
    enforce_eager: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    vllm_args: str = Field(
        default="",
        description="Any other `vllm serve` flags, e.g. '--enable-auto-tool-choice "
        "--tool-call-parser hermes' or '--chat-template FILE'.",
    )

    # --- HTTP -------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    max_request_bytes: int = 2_000_000

    # --- storage ----------------------------------------------------------------------
    adapters_dir: Path = REPO_ROOT / "adapters"
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; None: sqlite file in cache_dir."
    )
    max_adapter_bytes: int = 512 * 1024 * 1024
    default_patches: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Patches applied by default to anonymous dev-mode requests; env: a,b",
    )

    # --- security ---------------------------------------------------------------------
    admin_token: SecretStr | None = None
    dev_mode: bool = False

    # --- operations -------------------------------------------------------------------
    log_json: bool = False
    log_level: str = "INFO"
    log_prompts: bool = False
    drain_timeout_s: float = 30.0

    # --- orthogonality ----------------------------------------------------------------
    ortho_k: int | None = None  # None: the adapter's rank, as in the paper

    # --- replicas (several servers on one database; docs/deployment.md) ---------------
    # names this server in the audit log; hostname:pid unless set
    replica_id: str = Field(default_factory=default_replica_id)
    # how often the in-memory snapshot checks the database's change version (staleness bound)
    snapshot_refresh_s: float = Field(0.25, gt=0, le=5)

    # --- patch factory data -------------------------------------------------------------
    data_dir: Path | None = Field(
        default=None,
        description="Folder of training/evaluation sets that may not be vendored (CC BY-NC: "
        "the Alpaca-derived harmless set, Safety-Tuned LLaMAs); prompt files named by bare "
        "name are looked up here after app/factory/data.",
    )

    @field_validator("default_patches", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("SAFEPATCH_CONFIG_FILE")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.cache_dir / 'safepatch.db'}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
