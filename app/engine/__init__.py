"""Engine layer: one interface over vLLM's async engine (and a fake for HTTP unit tests)."""
