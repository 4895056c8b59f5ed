"""Top-k singular subspaces of a base model's weights, computed once and cached on disk.

`SubspaceStore(model_dir, cache_dir)` reads weights straight from the model's safetensors
files (one open per file per batch, one tensor in memory at a time), takes the top-k SVD
(exact for small matrices, otherwise randomized block Krylov, `linalg.randomized_top_k`,
checked by its a-posteriori residual and redone with more iterations, or exactly, when that
check fails) and writes
`<cache_dir>/subspaces/<fingerprint>/<content>/<weight name>.k<k>.safetensors`.

`fingerprint` is `app.model.identity.model_identity(model_dir)['fingerprint']` (architecture +
shapes). Two checkpoints of one architecture share it, so a second key level, `content`, hashes
the safetensors headers and a few sampled data blocks: a fine-tune never reuses its base
model's subspaces. A cached top-k' with k' ≥ k serves k by slicing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.constants import MODEL_CONFIG_FILE
from app.files import atomic_write
from app.model.identity import model_identity, weights_digest
from app.orthogonality import linalg

logger = logging.getLogger(__name__)

_CACHE_FILE = re.compile(r"^(.+)\.k(\d+)\.safetensors$")


@dataclass(frozen=True)
class Subspace:
    """Top-k singular triplets of one base weight W (d_out × d_in)."""

    weight: str  # e.g. "model.layers.0.self_attn.q_proj.weight"
    U: torch.Tensor  # [d_out, k] left singular vectors, U₀
    S: torch.Tensor  # [k]
    V: torch.Tensor  # [d_in, k] right singular vectors, V₀
    method: str  # "exact" | "randomized"
    residual: float  # linalg.residual_norm of the triplets (0 for exact)

    @property
    def k(self) -> int:
        return int(self.S.shape[0])

    def top(self, k: int) -> Subspace:
        if k == self.k:
            return self
        return Subspace(
            self.weight, self.U[:, :k], self.S[:k], self.V[:, :k], self.method, self.residual
        )


class SubspaceStore:
    """Cached top-k subspaces of one model's 2-D weights. Thread-safe; one per model dir."""

    def __init__(
        self,
        model_dir: Path,
        cache_dir: Path,
        *,
        exact_max_dim: int = 768,
        oversample: int = 10,
        n_iter: int = 6,
        max_n_iter: int = 12,
        residual_tol: float = 1e-2,
        memory: bool = True,
    ) -> None:
        self.model_dir = Path(model_dir).resolve()
        if not (self.model_dir / MODEL_CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a HF model directory")
        self.identity = model_identity(self.model_dir)
        self.content = weights_digest(self.model_dir)
        self.root = Path(cache_dir) / "subspaces" / self.identity["fingerprint"] / self.content
        self.exact_max_dim = exact_max_dim
        self.oversample = oversample
        self.n_iter = n_iter
        self.max_n_iter = max_n_iter
        self.residual_tol = residual_tol
        self._memory: dict[str, Subspace] | None = {} if memory else None
        self._lock = threading.Lock()
        self._files: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(self.model_dir.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    self._files[name] = file
                    self._shapes[name] = tuple(fh.get_slice(name).get_shape())

    # --- weights ------------------------------------------------------------------------
    def shape(self, weight: str) -> tuple[int, ...] | None:
        return self._shapes.get(weight)

    def resolve(self, module: str) -> str | None:
        """Base weight name for a module path ("model.layers.0.mlp.up_proj"), or None when the
        model has no such 2-D weight (e.g. `lm_head` with tied embeddings)."""
        candidate = module if module.endswith(".weight") else module + ".weight"
        if candidate not in self._shapes:
            suffix = "." + candidate
            hits = [n for n in self._shapes if n.endswith(suffix) or candidate.endswith("." + n)]
            if len(hits) != 1:
                return None
            candidate = hits[0]
        return candidate if len(self._shapes[candidate]) == 2 else None

    # --- cache --------------------------------------------------------------------------
    def cache_path(self, weight: str, k: int) -> Path:
        return self.root / f"{weight}.k{k}.safetensors"

    def _disk_index(self) -> dict[str, list[int]]:
        """{weight name: cached k's, ascending} from one listing of the cache directory."""
        index: dict[str, list[int]] = {}
        if self.root.is_dir():
            for entry in os.scandir(self.root):
                m = _CACHE_FILE.match(entry.name)
                if m:
                    index.setdefault(m.group(1), []).append(int(m.group(2)))
        return {name: sorted(ks) for name, ks in index.items()}

    def _load_cached(self, weight: str, k: int, index: dict[str, list[int]]) -> Subspace | None:
        if self._memory is not None:
            best = self._memory.get(weight)
            if best is not None and best.k >= k:
                return best.top(k)
        ks = [kk for kk in index.get(weight, []) if kk >= k]
        if not ks:
            return None
        with safe_open(str(self.cache_path(weight, ks[0])), framework="pt") as fh:
            meta = fh.metadata() or {}
            U, S, V = (fh.get_tensor(name) for name in ("U", "S", "V"))
        sub = Subspace(
            weight, U, S, V, meta.get("method", "unknown"), float(meta.get("residual", "nan"))
        )
        self._remember(sub)
        return sub.top(k)

    def _remember(self, sub: Subspace) -> None:
        if self._memory is not None:
            with self._lock:
                old = self._memory.get(sub.weight)
                if old is None or old.k < sub.k:
                    self._memory[sub.weight] = sub

    def put(self, sub: Subspace, meta: dict[str, str]) -> None:
        """Write one subspace to the disk cache (atomically) and keep it in memory."""
        tensors = {"U": sub.U.contiguous(), "S": sub.S.contiguous(), "V": sub.V.contiguous()}
        atomic_write(
            self.cache_path(sub.weight, sub.k),
            lambda tmp: save_file(tensors, str(tmp), metadata=meta),
        )
        self._remember(sub)

    # --- computation --------------------------------------------------------------------
    def compute(self, W: torch.Tensor, k: int) -> tuple[linalg.LowRankSVD, str, float, int]:
        """(top-k triplets, method, residual, iterations) for one weight, by this store's
        policy (see `top_k_subspace`)."""
        return top_k_subspace(
            W,
            k,
            exact_max_dim=self.exact_max_dim,
            oversample=self.oversample,
            n_iter=self.n_iter,
            max_n_iter=self.max_n_iter,
            residual_tol=self.residual_tol,
        )

    def get(self, weight: str, k: int) -> Subspace:
        return self.get_many({weight: k})[weight]

    def get_many(self, requests: dict[str, int]) -> dict[str, Subspace]:
        """{weight name: k} -> {weight name: Subspace}; computes what is not cached, opening
        each safetensors file once and holding one weight tensor in memory at a time."""
        out: dict[str, Subspace] = {}
        missing: dict[Path, list[str]] = {}
        index = self._disk_index()
        for weight, k in requests.items():
            shape = self._shapes.get(weight)
            if shape is None or len(shape) != 2:
                raise KeyError(f"{self.model_dir.name} has no 2-D weight {weight!r}")
            linalg.check_k(k, shape)
            cached = self._load_cached(weight, k, index)
            if cached is not None:
                out[weight] = cached
            else:
                missing.setdefault(self._files[weight], []).append(weight)
        for file, weights in missing.items():
            with safe_open(str(file), framework="pt") as fh:
                for weight in weights:
                    k = requests[weight]
                    start = time.perf_counter()
                    W = fh.get_tensor(weight)  # [d_out, d_in]
                    top, method, residual, n_iter = self.compute(W, k)
                    del W
                    sub = Subspace(
                        weight,
                        top.U.float().contiguous(),
                        top.S.float(),
                        top.V.float().contiguous(),
                        method,
                        residual,
                    )
                    self.put(
                        sub,
                        {
                            "method": method,
                            "residual": repr(residual),
                            "n_iter": str(n_iter),
                            "oversample": str(self.oversample),
                            "seconds": f"{time.perf_counter() - start:.3f}",
                            "model": json.dumps(self.identity),
                            "content": self.content,
                        },
                    )
                    out[weight] = sub
        return out


def top_k_subspace(
    W: torch.Tensor,
    k: int,
    *,
    exact_max_dim: int = 768,
    oversample: int = 10,
    n_iter: int = 6,
    max_n_iter: int = 12,
    residual_tol: float = 1e-2,
) -> tuple[linalg.LowRankSVD, str, float, int]:
    """Top-k SVD of W -> (triplets, "exact" | "randomized", residual, iterations).

    Exact when min(d_out, d_in) ≤ max(`exact_max_dim`, 2(k + p)); otherwise randomized block
    Krylov, accepted when `linalg.residual_norm` ≤ `residual_tol`, else redone with twice the
    iterations up to `max_n_iter`, then exactly (logged)."""
    linalg.check_k(k, W.shape)
    if min(W.shape) <= max(exact_max_dim, 2 * (k + oversample)):
        return linalg.exact_top_k(W, k), "exact", 0.0, 0
    while True:
        top = linalg.randomized_top_k(W, k, oversample=oversample, n_iter=n_iter)
        residual = linalg.residual_norm(W, top)
        if residual <= residual_tol:
            return top, "randomized", residual, n_iter
        if n_iter >= max_n_iter:
            break
        n_iter = min(2 * n_iter, max_n_iter)
    logger.warning(
        "randomized SVD residual %.2e > %.0e after %d iterations on a %s weight; "
        "using the exact SVD",
        residual,
        residual_tol,
        n_iter,
        tuple(W.shape),
    )
    return linalg.exact_top_k(W, k), "exact", 0.0, 0


_STORES: dict[tuple[Path, Path, str], SubspaceStore] = {}
_STORES_LOCK = threading.Lock()


def get_store(model_dir: Path, cache_dir: Path) -> SubspaceStore:
    """Process-wide store per (model dir, cache dir, content), so repeated scoring keeps the
    subspaces in memory (for an 8B model at k = 16 about 170 MiB)."""
    model_dir = Path(model_dir).resolve()
    key = (model_dir, Path(cache_dir).resolve(), weights_digest(model_dir))
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = SubspaceStore(model_dir, cache_dir)
        return store


def forget_stores() -> None:
    """Drop every process-wide store (their in-memory subspaces): the next `get_store` reads
    the disk cache again, as a fresh process would."""
    with _STORES_LOCK:
        _STORES.clear()
