"""Safety patches: LoRA adapters with SafePatch metadata, validation and exact stacking."""
