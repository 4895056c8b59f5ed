"""Orthogonality of LoRA safety patches to the base model's principal subspaces (issue 5).

- `linalg`: pure tensor functions (ΔW's SVD from its factors, φ, principal angles, energy,
  randomized top-k SVD).
- `subspaces`: top-k subspaces of the base weights, cached on disk per model.
- `adapter`: an adapter as the scorer reads it (through app.lora, the one LoRA reader).
- `scoring`: `score_adapter(...) -> AdapterScore`; `results`: the scores as data and JSON.
- `interference`: `interference(...)` between patches.
- `plot`: `plot_adapter_score(score, out_png)`.
"""
