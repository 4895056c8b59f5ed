"""Harm-selective input subspaces: where a patch may read its input from.

A LoRA update ΔW = B A acts on every token, benign ones included, so a patch that changes the
model on harmful requests tends to change it everywhere. The patch's output on an input x is
B (A x): it is small on benign tokens if A's rows lie in directions where benign inputs have
little energy and harmful inputs have much. Per patched module we take the second moments of
its inputs (uncentred, over token positions)

    C_b = E_benign[x xᵀ],   C_h = E_harmful[x xᵀ]      (d × d)

and the directions that maximise the generalised Rayleigh quotient  wᵀ C_h w / wᵀ C_b w,
i.e. the top eigenvectors of the generalised problem  C_h w = λ C_b w  (Fisher's discriminant
on second moments; Fukunaga 1990, §10). λ is how many times more energy harmful tokens have
along w than benign ones. Training keeps A inside the span of the top `dims` directions W by
parametrising it, A = C Wᵀ with only C (r × dims) trained. W is C_b-orthonormal
(Wᵀ C_b W = I), so each coordinate Wᵀx has unit energy on benign tokens and λ_i on harmful
ones, and a plain optimiser step moves harmful outputs √λ_i times more than benign ones. It is
a constraint in the spirit of null-space constrained editing (Fang et al. 2024, "AlphaEdit",
arXiv:2410.02355), with the subspace picked for selectivity instead of an exact null space,
which the benign activations of a small model do not have. The saved adapter is a plain LoRA
(A = C Wᵀ materialised), so serving needs nothing new.

Benign positions are the prompt *and* the base model's own response (the tokens the patch
must not disturb while answering); harmful positions are the request's prompt tokens, where
the decision to refuse is made. `selective_moments` sums groups, so a recipe can add one more
benign group (bench/experiments/selective_against.py: other categories' requests, their last
tokens, weighted like the rest however few they are).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch.nn.utils import parametrize
from tqdm import tqdm

from app.factory.cache import load_cached, save_cached
from app.factory.preserve import pad_batch

MOMENTS_VERSION = 2  # bump when what the cached moments hold changes (2: benign tails added)
RIDGE = 1e-3  # C_b += RIDGE · tr(C_b)/d · I: keeps the whitening finite along unused directions


def selective_basis(c_harmful: torch.Tensor, c_benign: torch.Tensor, dims: int) -> torch.Tensor:
    """(d, dims) top generalised eigenvectors W of C_h w = λ C_b w, most selective first,
    scaled so Wᵀ C_b W = I. Solved as an ordinary symmetric problem after whitening by
    C_b = L Lᵀ: (L⁻¹ C_h L⁻ᵀ) v = λ v, w = L⁻ᵀ v. Computed in float64."""
    c_h, c_b = c_harmful.double(), c_benign.double()
    d = c_b.shape[0]
    c_b = c_b + RIDGE * torch.trace(c_b) / d * torch.eye(d, dtype=c_b.dtype)
    chol_inv = torch.linalg.inv(torch.linalg.cholesky(c_b))  # L⁻¹, (d, d)
    _, vecs = torch.linalg.eigh(chol_inv @ c_h @ chol_inv.T)  # ascending eigenvalues
    return (chol_inv.T @ vecs[:, -dims:].flip(1)).float()  # (d, dims)


class InSubspace(torch.nn.Module):
    """Parametrisation A = C Wᵀ of a LoRA A (r, d) by coordinates C (r, dims) on a fixed
    basis W (d, dims)."""

    def __init__(self, basis: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("basis", basis)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return coords @ self.basis.T  # (r, dims) @ (dims, d) -> (r, d)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Least-squares coordinates of `weight` (its projection onto the span)."""
        return torch.linalg.lstsq(self.basis, weight.T).solution.T  # (r, dims)


def constrain_lora_inputs(pairs: Iterable[tuple[torch.nn.Module, torch.Tensor]], seed: int) -> None:
    """Parametrise each LoRA A module's weight as C Wᵀ (see `InSubspace`), C drawn from
    N(0, 1/dims) so C Wᵀx starts at unit scale on benign tokens, like a fresh LoRA's A x."""
    gen = torch.Generator().manual_seed(seed)
    for module, basis in pairs:
        parametrize.register_parametrization(module, "weight", InSubspace(basis), unsafe=True)
        coords = module.parametrizations.weight.original  # (r, dims)
        with torch.no_grad():
            coords.copy_(torch.randn(coords.shape, generator=gen) / basis.shape[1] ** 0.5)


def materialise_lora_inputs(modules: Iterable[torch.nn.Module]) -> None:
    """Back to plain weights A = C Wᵀ, so the adapter saves and serves as an ordinary LoRA."""
    for module in modules:
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


class MomentCollector:
    """Accumulates E[x xᵀ] of the inputs of the named linear modules over chosen positions.
    Modules fed the same tensor (q/k/v, gate/up) share one accumulator."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        self.modules = dict(model.named_modules())
        self.names = list(names)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.alias: dict[str, str] = {}  # module name -> name of the accumulator it shares
        self._mask: torch.Tensor | None = None  # (batch, seq) positions to count

    @torch.no_grad()
    def run(
        self,
        model: torch.nn.Module,
        sequences: Sequence[Sequence[int]],
        counted: Sequence[tuple[int, int]],
        pad_id: int,
        *,
        batch_size: int = 16,
        desc: str = "input moments",
    ) -> None:
        """Forward `sequences`; position p of sequence i counts when counted[i][0] <= p <
        counted[i][1]."""
        # id -> (owner, tensor): holding the tensor keeps its id from being reused mid-forward
        seen: dict[int, tuple[str, torch.Tensor]] = {}
        handles = []
        for name in self.names:

            def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                x = args[0]
                owner = seen.setdefault(id(x), (name, x))[0]  # first module to see x owns it
                self.alias[name] = owner
                if owner != name:
                    return
                assert self._mask is not None
                rows = x[self._mask].double()  # (n_positions, d)
                self.sums[name] = self.sums.get(name, 0) + rows.T @ rows
                self.counts[name] = self.counts.get(name, 0) + rows.shape[0]

            handles.append(self.modules[name].register_forward_pre_hook(hook))
        try:
            for start in tqdm(range(0, len(sequences), batch_size), desc=desc, unit="batch"):
                chunk = sequences[start : start + batch_size]
                ids, attention = pad_batch(chunk, pad_id)
                positions = torch.arange(ids.shape[1])  # (seq,)
                lo = torch.tensor([c[0] for c in counted[start : start + batch_size]])
                hi = torch.tensor([c[1] for c in counted[start : start + batch_size]])
                self._mask = (positions >= lo[:, None]) & (positions < hi[:, None])
                seen.clear()
                model(input_ids=ids, attention_mask=attention)
        finally:
            for handle in handles:
                handle.remove()
            self._mask = None

    def moments(self) -> dict[str, torch.Tensor]:
        """Module name -> E[x xᵀ] (d, d), float64; modules sharing an input share the tensor."""
        owned = {n: self.sums[n] / self.counts[n] for n in self.sums}
        return {n: owned[self.alias[n]] for n in self.names}


Spans = tuple[Sequence[Sequence[int]], Sequence[tuple[int, int]]]  # (sequences, counted spans)


def selective_moments(
    model: torch.nn.Module,
    names: Sequence[str],
    harmful: Sequence[Spans],
    benign: Sequence[Spans],
    pad_id: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """{"harmful": C_h, "benign": C_b}, each module name -> (d, d). A kind's C is the sum of
    the mean moments of its groups of (sequences, counted spans): a benign group of all
    positions plus one of the prompts' last tokens keeps a basis quiet on both, however few
    the latter are. Modules that read the same tensor share one moment tensor."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for groups, label in ((harmful, "harmful"), (benign, "benign")):
        total: dict[str, torch.Tensor] = {}
        owner: dict[str, str] = {}
        for sequences, counted in groups:
            collector = MomentCollector(model, names)
            collector.run(model, sequences, counted, pad_id, desc=f"input moments ({label})")
            owner = collector.alias
            for name, moment in collector.moments().items():
                if owner[name] == name:
                    total[name] = total.get(name, 0) + moment
        out[label] = {name: total[owner[name]] for name in names}
    return out


def selective_bases(
    moments: dict[str, dict[str, torch.Tensor]], dims: int
) -> dict[str, torch.Tensor]:
    """Module name -> (d, dims) harm-selective basis; modules sharing moments share a basis."""
    by_input: dict[int, torch.Tensor] = {}
    bases = {}
    for name, c_b in moments["benign"].items():
        if id(c_b) not in by_input:
            by_input[id(c_b)] = selective_basis(moments["harmful"][name], c_b, dims)
        bases[name] = by_input[id(c_b)]
    return bases


def cached_moments(
    model: torch.nn.Module,
    names: Sequence[str],
    *,
    harmful: Sequence[Sequence[int]],
    benign: Sequence[tuple[Sequence[int], Sequence[int]]],
    tail: int,
    pad_id: int,
    cache_root: Path | None,
    cache_salt: str,
) -> dict[str, dict[str, torch.Tensor]]:
    """`selective_moments` of harmful prompts (their last `tail` tokens; 0: all) against benign
    (prompt, base response) pairs (every position, plus the prompts' last `tail` tokens when
    tail > 0), cached on disk by everything it depends on: the pass takes minutes on a CPU."""
    sequences = [list(p) + list(r) for p, r in benign]
    key = hashlib.sha256(
        json.dumps([cache_salt, harmful, sequences, sorted(names), tail, MOMENTS_VERSION]).encode()
    ).hexdigest()[:24]
    cache = cache_root / f"{key}.pt" if cache_root is not None else None
    if (moments := load_cached(cache)) is not None:
        return moments
    prompts = [p for p, _ in benign]
    moments = selective_moments(
        model,
        names,
        [(harmful, tails(harmful, tail))],
        [(sequences, [(0, len(s)) for s in sequences])]
        + ([(prompts, tails(prompts, tail))] if tail else []),
        pad_id,
    )
    save_cached(moments, cache)
    return moments


def tails(seqs: Sequence[Sequence[int]], tail: int) -> list[tuple[int, int]]:
    """Counted spans: each sequence's last `tail` positions (0: all of them)."""
    return [(max(0, len(s) - tail) if tail else 0, len(s)) for s in seqs]
