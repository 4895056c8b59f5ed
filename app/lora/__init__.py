"""The one LoRA-format module (see app.lora.adapter): every package reads, checks, scales and
writes PEFT LoRA adapters through these names."""

from app.lora.adapter import (
    HeaderInfo,
    LoraAdapter,
    LoraModule,
    adapter_rank,
    check_structure,
    leaf_names,
    read_checked,
    read_header,
    read_lora_adapter,
    split_keys,
    write_lora_adapter,
)
from app.lora.config import (
    LoraFormatError,
    config_rank_alpha,
    module_path,
    module_scaling,
    read_config,
    unsupported_features,
)

__all__ = [
    "HeaderInfo",
    "LoraAdapter",
    "LoraFormatError",
    "LoraModule",
    "adapter_rank",
    "check_structure",
    "config_rank_alpha",
    "leaf_names",
    "module_path",
    "module_scaling",
    "read_checked",
    "read_config",
    "read_header",
    "read_lora_adapter",
    "split_keys",
    "unsupported_features",
    "write_lora_adapter",
]
