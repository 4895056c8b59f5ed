"""`TrainConfig`: every option of a training run, in one place.

The CLI (`app/cli/train.py`) takes one option per field under the same name (checked by
`tests/factory/test_train_config.py`), and the patch's `training` metadata record is derived
from the fields (`training_record`), so a new option is added here once: give it a default
and, when it is a product option, a CLI parameter of the same name. Fields marked
`metadata={"record": False}` are where/how a run happens, not what it trains, and stay out of
the record; `metadata={"record_as": KEY}` stores a field under another key (the prompt sources
keep their historical names `harmful_sources`/`preserve_sources`, which evaluation reads).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from app.factory.data import PromptSource

Mode = Literal["safety-only", "preserving"]
DEFAULT_TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]
LOCAL = {"record": False}  # a run detail: not part of what the patch is


@dataclass
class TrainConfig:
    model_dir: Path = field(metadata=LOCAL)
    out_dir: Path = field(metadata=LOCAL)
    name: str = field(metadata=LOCAL)  # metadata has its own `name`
    harmful: list[PromptSource] = field(metadata={"record_as": "harmful_sources"})
    preserve: list[PromptSource] = field(
        default_factory=list, metadata={"record_as": "preserve_sources"}
    )
    mode: Mode = "preserving"
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    layers: list[int] | None = None
    lr: float = 2e-4
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 8
    preserve_batch_size: int = 8
    preserve_weight: float = 1.0
    margin_weight: float = 0.0  # >0: add margin_weight × mean margin hinge (preserve.py)
    preserve_tokens: int = 32
    kl_top_k: int = 64
    decision_tokens: int = 0  # the first N response positions weigh decision_weight (losses.py)
    decision_weight: float = 1.0
    selective_dims: int = 0  # >0: keep LoRA A in the top harm-selective input directions
    selective_tail: int = 0  # >0: harmful moments from each prompt's last N tokens only
    seed: int = 0
    refusal_category: str | None = None
    calibrate_gate: bool = True  # calibrate the gate on the dev split at the end (gate block)
    description: str = field(default="", metadata=LOCAL)  # metadata has its own
    categories: list[str] = field(default_factory=list, metadata=LOCAL)  # likewise
    command: str = ""
    cache_dir: Path | None = field(default=None, metadata=LOCAL)
    threads: int | None = field(default=None, metadata=LOCAL)  # torch intra-op threads


def plain(value: Any) -> Any:
    """JSON form of a config value: a prompt source as its round-trippable spec, a path as a
    string, containers element-wise."""
    if isinstance(value, PromptSource):
        return value.spec()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def training_record(config: TrainConfig, **run: Any) -> dict[str, Any]:
    """The `training` metadata: every recorded field of `config`, then what the run measured
    (`run`: steps taken, counts, losses, hashes, …), which wins on a shared key (`steps`)."""
    record = {
        f.metadata.get("record_as", f.name): plain(getattr(config, f.name))
        for f in fields(config)
        if f.metadata.get("record", True)
    }
    if config.mode != "preserving":  # unused in safety-only mode: not what the patch saw
        record["preserve_sources"] = []
    return record | run


def config_fields() -> dict[str, Any]:
    """Field name -> dataclasses.Field, for the CLI check."""
    return {f.name: f for f in fields(TrainConfig)}
