"""Label-noise injection for the benchmarks (bench/seed_methods.py) and their tests: SelfPLL
`util.py` get_corrupted_target transition matrices and seeded draws from them.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def noise_matrix(kind: Literal["symmetric", "asymmetric", "cluster"], K: int, eta: float,
                 clusters: Tensor | None = None) -> Tensor:
    """SelfPLL `util.py` get_corrupted_target transition matrices, (K, K) float64, rows sum to 1.

    symmetric: 1 − η on the diagonal, η/(K − 1) elsewhere. asymmetric: 1 − η on the diagonal,
    2η/K on the next class (k+1 mod K), η/K on the rest. cluster: η spread evenly over the other
    members of the class's cluster (``clusters`` (K,) ids); singleton clusters keep their label
    (the official code leaves those rows summing to 1 − η).
    """
    if K < 2 or not 0.0 <= eta <= 1.0:
        raise ValueError(f"need K >= 2 and 0 <= eta <= 1; got K={K}, eta={eta}")
    if kind == "symmetric":
        m = torch.full((K, K), eta / (K - 1), dtype=torch.float64)
    elif kind == "asymmetric":
        m = torch.full((K, K), eta / K, dtype=torch.float64)
        idx = torch.arange(K)
        m[idx, (idx + 1) % K] += eta / K
    elif kind == "cluster":
        if clusters is None or clusters.shape != (K,):
            raise ValueError("cluster noise needs clusters: a (K,) tensor of cluster ids")
        same = (clusters[:, None] == clusters[None, :]) & ~torch.eye(K, dtype=torch.bool)  # (K, K)
        n_other = same.sum(dim=1, keepdim=True)                                            # (K, 1)
        m = torch.where(same, eta / n_other.clamp_min(1).double(), torch.zeros((), dtype=torch.float64))
        if (n_other == 0).any():
            log.warning("cluster noise: %d singleton classes keep their labels", int((n_other == 0).sum()))
        m.diagonal().copy_(1 - m.sum(dim=1))
        return m
    else:
        raise ValueError(f"unknown noise kind {kind!r}; choose symmetric, asymmetric or cluster")
    m.fill_diagonal_(1 - eta)
    return m


def inject_label_noise(labels: Tensor, matrix: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw ỹ_i ~ matrix[y_i] (SelfPLL `util.py` get_corrupted_target), with an explicit generator."""
    K = matrix.shape[0]
    if labels.dim() != 1 or (labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < K):
        raise ValueError(f"labels must be a (B,) tensor in [0, {K}); got shape {tuple(labels.shape)}")
    probs = matrix.double()[labels.long().cpu()]                           # (B, K)
    gdev = generator.device if generator is not None else torch.device("cpu")
    out = torch.multinomial(probs.to(gdev), 1, generator=generator).squeeze(1)  # (B,)
    return out.to(labels.device, labels.dtype)
