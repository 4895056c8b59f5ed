"""SubspaceStore: randomized vs exact, the disk cache and its keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.model.identity import weights_digest
from app.orthogonality import linalg
from app.orthogonality.subspaces import SubspaceStore

NAME = "model.layers.0.mlp.up_proj.weight"


def _model_dir(path: Path, weights: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    save_file({n: w.contiguous() for n, w in weights.items()}, str(path / "model.safetensors"))
    return path


def _decaying(m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = min(m, n)
    U = torch.linalg.qr(torch.randn(m, p, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64))[0]
    return ((U * 0.9 ** torch.arange(p, dtype=torch.float64)) @ V.T).float()


def test_randomized_store_matches_exact_and_is_cached(tmp_path, monkeypatch):
    W = _decaying(320, 160, seed=0)
    model = _model_dir(tmp_path / "m", {NAME: W, "model.norm.weight": torch.ones(160)})
    store = SubspaceStore(model, tmp_path / "cache", exact_max_dim=0)
    sub = store.get(NAME, 12)
    assert sub.method == "randomized" and sub.residual < 1e-2
    assert sub.U.shape == (320, 12) and sub.V.shape == (160, 12) and sub.U.dtype == torch.float32
    exact = linalg.exact_top_k(W, 12, dtype=torch.float64)
    assert linalg.subspace_similarity(sub.V, exact.V) > 1 - 1e-5
    assert linalg.subspace_similarity(sub.U, exact.U) > 1 - 1e-5
    path = store.cache_path(NAME, 12)
    fingerprint = store.identity["fingerprint"]
    assert path.is_file() and path.parent.parent.name == fingerprint
    assert path.parent.parent.parent == tmp_path / "cache" / "subspaces"

    # A fresh store (new process) reads the cache: no weight is touched, no SVD runs.
    def boom(*args, **kwargs):
        raise AssertionError("recomputed a cached subspace")

    monkeypatch.setattr(SubspaceStore, "compute", boom)
    again = SubspaceStore(model, tmp_path / "cache", memory=False)
    torch.testing.assert_close(again.get(NAME, 12).V, sub.V)
    # A smaller k is served from the cached top-12 by slicing.
    torch.testing.assert_close(again.get(NAME, 5).V, sub.V[:, :5])
    assert not store.cache_path(NAME, 5).exists()
    with pytest.raises(AssertionError, match="recomputed"):
        again.get(NAME, 13)
    with pytest.raises(ValueError, match="k must be"):
        again.get(NAME, 161)
    with pytest.raises(KeyError):
        again.get("model.norm.weight", 1)


def test_flat_spectrum_falls_back_to_exact(tmp_path, caplog):
    W = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    model = _model_dir(tmp_path / "m", {NAME: W})
    store = SubspaceStore(
        model, tmp_path / "cache", exact_max_dim=0, residual_tol=1e-6, n_iter=1, max_n_iter=2
    )
    sub = store.get(NAME, 8)
    assert sub.method == "exact" and "using the exact SVD" in caplog.text
    exact = linalg.exact_top_k(W, 8, dtype=torch.float64)
    assert linalg.subspace_similarity(sub.V, exact.V) > 1 - 1e-6


def test_cache_key_separates_checkpoints_of_one_architecture(tmp_path):
    a = _model_dir(tmp_path / "a", {NAME: _decaying(64, 48, seed=0)})
    b = _model_dir(tmp_path / "b", {NAME: _decaying(64, 48, seed=1)})  # same shapes
    c = tmp_path / "c"
    shutil.copytree(a, c)  # same bytes elsewhere
    sa, sb, sc = (SubspaceStore(p, tmp_path / "cache") for p in (a, b, c))
    assert sa.identity["fingerprint"] == sb.identity["fingerprint"]
    assert weights_digest(a) != weights_digest(b) and sa.root != sb.root
    assert sa.root == sc.root
    va, vb = sa.get(NAME, 4).V, sb.get(NAME, 4).V
    assert linalg.subspace_similarity(va, vb) < 0.9  # b did not reuse a's cache
    assert sa.resolve("model.layers.0.mlp.up_proj") == NAME
    assert sa.resolve("layers.0.mlp.up_proj") == NAME  # prefix-less key, unique suffix
    assert sa.resolve("lm_head") is None  # tied embeddings: no such weight
