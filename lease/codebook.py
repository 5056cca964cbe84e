"""The discriminative codebook: centroids, their neighbour table and the contrast targets.

Paper §3.2: for a token whose discriminative id is c, the positives are c itself and its n most
similar centroids by cosine similarity (eq. 2), weighted by w = softmax(sim / tau_w) (eq. 3).
The neighbour table never changes during training, so it is computed once here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class NeighbourTable:
    """For each of the K centroids: itself then its n nearest centroids (cosine)."""

    index: torch.Tensor  # long [K, n+1]; column 0 is the centroid itself
    similarity: torch.Tensor  # float [K, n+1]; column 0 is 1 (cosine with itself)

    def weights(self, tau: float) -> torch.Tensor:
        """Adaptive neighbour weights w = softmax(sim / tau) over the n+1 positives (eq. 3)."""
        return torch.softmax(self.similarity / tau, dim=-1)


def load_codebook(path: str | Path) -> torch.Tensor:
    """Read centroids float32 [K, D] from a `.npy` file (ours, or DiGIT's `km_16k.npy`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"codebook file {path} does not exist (expected a float32 [K, D] .npy)")
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"codebook {path} has shape {array.shape}; expected [K, D] with K >= 2")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


@torch.no_grad()
def neighbour_table(centroids: torch.Tensor, num_neighbours: int, chunk: int = 4096) -> NeighbourTable:
    """Self + top-`num_neighbours` centroids by cosine similarity, computed in row chunks.

    The centroid itself is always column 0 (even if another centroid is an exact duplicate).
    """
    k = centroids.shape[0]
    if not 0 <= num_neighbours < k:
        raise ValueError(f"num_neighbours={num_neighbours} must be in [0, K-1] for a codebook of K={k}")
    unit = F.normalize(centroids.float(), dim=-1)
    index_rows, sim_rows = [], []
    for start in range(0, k, chunk):
        rows = torch.arange(start, min(start + chunk, k), device=unit.device)
        sims = unit[rows] @ unit.T
        sims[torch.arange(len(rows)), rows] = float("inf")  # force self to be first
        sim, idx = sims.topk(num_neighbours + 1, dim=-1)
        sim[:, 0] = 1.0
        index_rows.append(idx)
        sim_rows.append(sim)
    return NeighbourTable(index=torch.cat(index_rows), similarity=torch.cat(sim_rows))
