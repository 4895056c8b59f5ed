"""Patch factory: refusal-SFT training of LoRA safety patches and their safety evaluation.

`data` reads prompt files and splits them deterministically, `templates` writes refusals,
`train` fits a patch (modes `safety-only` and `preserving`), `judge` decides what is a refusal,
`evaluate` runs prompt sets through the real vLLM engine, `report` writes JSON / PNG / tables.
"""

DATA_DIR_NAME = "data"
