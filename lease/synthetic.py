"""Synthetic token sets for benchmarks and tests: uniform noise, or planted structure that can be learnt.

Planted structure: each class prefers a few "concepts"; each concept has several synonymous generative
codes, and the codebook id of a token is its concept. Reconstruction alone must discover that synonyms
agree; the codebook contrast says so directly.
"""
from __future__ import annotations

import numpy as np
import torch

from lease.data import TokenSet


def uniform_tokens(n: int, seq_len: int, vocab_gen: int, codebook_size: int, seed: int) -> TokenSet:
    """Independent uniform codes and codebook ids: the shapes of real data, nothing to learn."""
    gen = torch.Generator().manual_seed(seed)
    return TokenSet(vq=torch.randint(0, vocab_gen, (n, seq_len), generator=gen, dtype=torch.int32).to(torch.uint16),
                    disc=torch.randint(0, codebook_size, (n, seq_len), generator=gen, dtype=torch.int32).to(torch.uint16),
                    labels=torch.zeros(n, dtype=torch.int64), keys=[])


def planted_tokens(n: int, num_classes: int, seq_len: int, concepts: int, synonyms: int, seed: int,
                   concentration: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vq, disc, labels) arrays; class preferences over concepts ~ Dirichlet(concentration): small =
    peaky, easy to tell apart. Codes are concept * synonyms + a uniform synonym index."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    prefs = np.random.default_rng(1234).dirichlet(np.full(concepts, concentration), size=num_classes)
    concept = np.stack([rng.choice(concepts, size=seq_len, p=prefs[c]) for c in labels])
    vq = concept * synonyms + rng.integers(0, synonyms, size=concept.shape)
    return vq.astype(np.uint16), concept.astype(np.uint16), labels.astype(np.int64)


def planted_codebook(concepts: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(concepts, dim)).astype(np.float32)


def planted_token_set(n: int, num_classes: int, seq_len: int, vocab_gen: int, synonyms: int,
                      seed: int) -> TokenSet:
    """`planted_tokens` over a model's whole code vocabulary (vocab_gen / synonyms concepts)."""
    if vocab_gen % synonyms:
        raise ValueError(f"vocab_gen={vocab_gen} is not a multiple of synonyms={synonyms}")
    vq, disc, labels = planted_tokens(n, num_classes, seq_len, vocab_gen // synonyms, synonyms, seed)
    return TokenSet(torch.from_numpy(vq), torch.from_numpy(disc), torch.from_numpy(labels), keys=[])
