"""Planted-structure token data written as real packed shards (the pack stage's sample format).

Each class prefers a few "concepts"; each concept has several synonymous generative codes, and the
codebook id of a token is its concept. Reconstruction alone must discover that synonyms agree; the
codebook contrast says so directly.
"""
from pathlib import Path

import numpy as np
import webdataset as wds


def planted_tokens(n: int, num_classes: int, seq_len: int, concepts: int, synonyms: int, seed: int,
                   concentration: float = 0.2):
    """Class preferences over concepts ~ Dirichlet(concentration): small = peaky, easy to tell apart."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    prefs = np.random.default_rng(1234).dirichlet(np.full(concepts, concentration), size=num_classes)
    concept = np.stack([rng.choice(concepts, size=seq_len, p=prefs[c]) for c in labels])
    vq = concept * synonyms + rng.integers(0, synonyms, size=concept.shape)
    return vq.astype(np.uint16), concept.astype(np.uint16), labels.astype(np.int64)


def write_shards(out: Path, vq, disc, labels, per_shard: int, prefix: str = "train") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(labels), per_shard):
        with wds.TarWriter(str(out / f"{prefix}-{start // per_shard:06d}.tar")) as sink:
            for i in range(start, min(start + per_shard, len(labels))):
                sink.write({"__key__": f"{prefix}{i:07d}", "vq.npy": vq[i], "disc.npy": disc[i],
                            "cls": str(int(labels[i]))})
    return out


def planted_codebook(concepts: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(concepts, dim)).astype(np.float32)
