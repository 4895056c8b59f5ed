"""SafePatch: per-tenant, per-request LoRA safety patches served on vLLM."""

__version__ = "0.1.0"
