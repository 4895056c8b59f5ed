"""Orthogonality of LoRA safety patches to the base model's principal subspaces (issue 5).

- `linalg`: pure tensor functions (ΔW's SVD from its factors, φ, principal angles, energy,
  randomized top-k SVD).
- `subspaces`: top-k subspaces of the base weights, cached on disk per model.
- `adapter`: reading a PEFT LoRA adapter directory.
- `scoring`: `score_adapter(...) -> AdapterScore` and `interference(...)` between patches.
- `plot`: `plot_adapter_score(score, out_png)`.
"""
