"""Names shared across packages: adapter file names, patch-name rules, refused file types."""

from __future__ import annotations

import re

CONFIG_FILE = "adapter_config.json"  # PEFT's adapter config
WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's adapter weights (safetensors only)
METADATA_FILE = "safepatch.json"  # SafePatch's record beside them (app.patches.metadata)
MODEL_CONFIG_FILE = "config.json"  # a Hugging Face model directory's config

# A patch name: lowercase, 1-63 characters, no '/' and no leading '.'.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
STACK_PREFIX = "stack-"  # names of stacked adapters (app.patches.stacking), reserved
# Pickled weight files: refused at upload and in an adapter directory (they can run code).
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
