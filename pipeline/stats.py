"""Token statistics of the two codebooks (paper appendix D).

For position-aligned pairs (g, d) — the VQGAN code g and the codebook id d of the same patch — we count
the joint co-occurrences n(g, d) and report, in nats:

    H(G) = -sum_g p(g) log p(g),            H(D) likewise,       H(G, D) from p(g, d)
    H(G | D) = H(G, D) - H(D) = -sum_{g,d} p(g, d) log p(g | d)
    H(D | G) = H(G, D) - H(G),              I(G; D) = H(G) + H(D) - H(G, D)

plus, per token, H(G | D = d) and H(D | G = g) (the distributions of the paper's figure D.1),
codebook utilisation (fraction of the vocabulary that occurs) and the token histograms.

The joint counts are kept sparse when the vocabulary product is large: joint ids g * K + d are
bincounted densely only while V_gen * K stays under `DENSE_JOINT_LIMIT` cells (1024 x 16384 = 16.8M
int64 cells = 134 MB fits), and otherwise merged as (np.unique ids, counts) per chunk.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lease.cli_help import first_paragraph, show_defaults
from lease.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

DENSE_JOINT_LIMIT = 1 << 25  # joint cells counted densely below this (256 MB of int64)
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
HIST_BINS = 50
LOW_ENTROPY_NATS = 1.0  # "low" per-token conditional entropy threshold reported as a count


def entropy(counts: np.ndarray) -> float:
    """Shannon entropy in nats of the distribution proportional to `counts` (zeros ignored)."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def per_token_conditional_entropy(given: np.ndarray, counts: np.ndarray, size: int) -> np.ndarray:
    """H(other | given = t) for every token t in [0, size): entropy of each row of the sparse joint.

    `given` [M] is the conditioning token of each nonzero joint cell, `counts` [M] its count; tokens
    that never occur get NaN.
    """
    totals = np.bincount(given, weights=counts, minlength=size)
    p = counts / totals[given]
    out = np.bincount(given, weights=-p * np.log(p), minlength=size)
    out[totals == 0] = np.nan
    return out


class JointCounter:
    """Streaming counts of aligned (gen, disc) token pairs; dense or sparse in the joint id space."""

    def __init__(self, vocab_gen: int, codebook_size: int, dense_limit: int = DENSE_JOINT_LIMIT):
        if vocab_gen < 1 or codebook_size < 1:
            raise ValueError(f"vocabulary sizes must be >= 1, got vocab_gen={vocab_gen}, codebook_size={codebook_size}")
        self.vocab_gen, self.codebook_size = vocab_gen, codebook_size
        self.cells = vocab_gen * codebook_size
        self.dense = np.zeros(self.cells, dtype=np.int64) if self.cells <= dense_limit else None
        self.sparse_ids = np.zeros(0, dtype=np.int64)
        self.sparse_counts = np.zeros(0, dtype=np.int64)
        self.num_images = 0

    def update(self, vq: np.ndarray, disc: np.ndarray) -> None:
        """Add images: `vq` [n, L] codes < vocab_gen and `disc` [n, L] ids < codebook_size, position-aligned."""
        vq, disc = np.asarray(vq), np.asarray(disc)
        if vq.shape != disc.shape:
            raise ValueError(f"vq {vq.shape} and disc {disc.shape} must have the same shape (position-aligned)")
        check_range("vq", vq, self.vocab_gen)
        check_range("disc", disc, self.codebook_size)
        joint = vq.astype(np.int64).ravel() * self.codebook_size + disc.astype(np.int64).ravel()
        if self.dense is not None:
            self.dense += np.bincount(joint, minlength=self.cells)
        else:
            ids, counts = np.unique(joint, return_counts=True)
            merged_ids = np.concatenate([self.sparse_ids, ids])
            merged_counts = np.concatenate([self.sparse_counts, counts])
            self.sparse_ids, inverse = np.unique(merged_ids, return_inverse=True)
            self.sparse_counts = np.bincount(inverse, weights=merged_counts).astype(np.int64)
        self.num_images += vq.shape[0] if vq.ndim > 1 else 1

    def nonzero(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gen ids, disc ids, counts) of every joint cell that occurred."""
        if self.dense is not None:
            ids = np.flatnonzero(self.dense)
            counts = self.dense[ids]
        else:
            ids, counts = self.sparse_ids, self.sparse_counts
        return ids // self.codebook_size, ids % self.codebook_size, counts

    def statistics(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(the dict written to `stats.json`, per-token conditional entropies) — see the module docstring."""
        gen, disc, counts = self.nonzero()
        gen_hist = np.bincount(gen, weights=counts, minlength=self.vocab_gen).astype(np.int64)
        disc_hist = np.bincount(disc, weights=counts, minlength=self.codebook_size).astype(np.int64)
        h_gen, h_disc, h_joint = entropy(gen_hist), entropy(disc_hist), entropy(counts)
        per_disc = per_token_conditional_entropy(disc, counts.astype(np.float64), self.codebook_size)
        per_gen = per_token_conditional_entropy(gen, counts.astype(np.float64), self.vocab_gen)
        return {
            "num_images": self.num_images,
            "num_tokens": int(counts.sum()),
            "vocab_gen": self.vocab_gen,
            "codebook_size": self.codebook_size,
            "codebook_utilisation": {"gen": float((gen_hist > 0).mean()), "disc": float((disc_hist > 0).mean())},
            "codes_used": {"gen": int((gen_hist > 0).sum()), "disc": int((disc_hist > 0).sum())},
            "entropy_nats": {"gen": h_gen, "disc": h_disc, "joint": h_joint,
                             "gen_given_disc": h_joint - h_disc, "disc_given_gen": h_joint - h_gen,
                             "mutual_information": h_gen + h_disc - h_joint},
            "perplexity": {"gen": float(np.exp(h_gen)), "disc": float(np.exp(h_disc))},
            "per_token_conditional_entropy": {"gen_given_disc": summarise(per_disc),
                                              "disc_given_gen": summarise(per_gen)},
            "histograms": {"gen": gen_hist.tolist(), "disc": disc_hist.tolist()},
        }, {"gen_given_disc": per_disc, "disc_given_gen": per_gen}


def check_range(name: str, tokens: np.ndarray, vocab: int) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(f"{name} tokens span [{tokens.min()}, {tokens.max()}] but the vocabulary has {vocab} "
                         "entries: pass the vocabulary size of the tokenizer/codebook that produced them")


def summarise(values: np.ndarray) -> dict[str, Any]:
    """Quantiles, mean and low-entropy count of per-token entropies (tokens that never occur excluded)."""
    seen = values[~np.isnan(values)]
    if seen.size == 0:
        return {"tokens": 0}
    return {"tokens": int(seen.size), "mean": float(seen.mean()),
            "quantiles": {str(q): float(np.quantile(seen, q)) for q in QUANTILES},
            f"below_{LOW_ENTROPY_NATS:g}_nat": int((seen < LOW_ENTROPY_NATS).sum())}


def token_statistics(vq: np.ndarray, disc: np.ndarray, vocab_gen: int, codebook_size: int) -> dict[str, Any]:
    """Statistics of aligned token arrays (any matching shapes) in one call (see `JointCounter.statistics`)."""
    counter = JointCounter(vocab_gen, codebook_size)
    counter.update(vq, disc)
    return counter.statistics()[0]


def plot_token_usage(stats: dict[str, Any], per_token: dict[str, np.ndarray], path: str | Path) -> None:
    """PNG: sorted token-frequency curves (log scale) of both codebooks and the per-token H(·|·) histograms."""
    fig = Figure(figsize=(11, 4))  # no pyplot: no global backend or figure state
    usage, cond = fig.subplots(1, 2)
    for name, label in (("gen", "generative (VQGAN)"), ("disc", "discriminative (k-means)")):
        counts = np.sort(np.asarray(stats["histograms"][name], dtype=np.float64))[::-1]
        freq = counts / max(counts.sum(), 1.0)
        rank = np.arange(1, freq.size + 1) / freq.size
        used = stats["codebook_utilisation"][name]
        usage.plot(rank[freq > 0], freq[freq > 0], label=f"{label}: {freq.size} codes, {100 * used:.1f}% used")
    usage.set(yscale="log", xlabel="token rank / vocabulary size", ylabel="frequency",
              title="token usage (sorted)")
    usage.legend(fontsize=8)
    seen = {name: values[~np.isnan(values)] for name, values in per_token.items()}
    edges = np.histogram_bin_edges(np.concatenate(list(seen.values())), bins=HIST_BINS)
    for name, label in (("gen_given_disc", "H(gen | disc = d)"), ("disc_given_gen", "H(disc | gen = g)")):
        if seen[name].size:
            cond.hist(seen[name], bins=edges, alpha=0.6, label=label)
    cond.set(xlabel="conditional entropy (nats)", ylabel="tokens", title="per-token conditional entropy")
    cond.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        fig.savefig(fh, format="png", dpi=100)


def write_statistics(counter: JointCounter, out_dir: str | Path, extra: dict[str, Any] | None = None,
                     plot_name: str = "token_usage.png") -> dict[str, Any]:
    """Write `stats.json` (plus `extra` keys) and the token-usage PNG into `out_dir`; return the stats."""
    out_dir = Path(out_dir)
    stats, per_token = counter.statistics()
    stats.update(extra or {})
    plot_token_usage(stats, per_token, out_dir / plot_name)
    atomic_write_json(out_dir / "stats.json", stats)
    ent = stats["entropy_nats"]
    log.info("tokens: utilisation gen %.3f disc %.3f; H(gen)=%.3f H(disc)=%.3f H(gen|disc)=%.3f H(disc|gen)=%.3f nats",
             stats["codebook_utilisation"]["gen"], stats["codebook_utilisation"]["disc"], ent["gen"], ent["disc"],
             ent["gen_given_disc"], ent["disc_given_gen"])
    return stats


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.stats --shards DIR_OR_GLOB --vocab-gen V --codebook-size K --out DIR`."""
    from lease.data import read_shard, resolve_shards

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m pipeline.stats", description=first_paragraph(__doc__))
    parser.add_argument("--shards", required=True, help="packed WebDataset shards: a directory of *.tar or a glob")
    parser.add_argument("--vocab-gen", type=int, required=True, help="VQGAN codebook size (1024 for MAGE's)")
    parser.add_argument("--codebook-size", type=int, required=True, help="k-means codebook size K")
    parser.add_argument("--out", required=True, type=Path, help="directory for stats.json and token_usage.png")
    args = show_defaults(parser).parse_args(argv)
    counter = JointCounter(args.vocab_gen, args.codebook_size)
    for shard in resolve_shards(args.shards):
        _, vq, disc, _ = read_shard(shard)
        counter.update(vq, disc)
    args.out.mkdir(parents=True, exist_ok=True)
    write_statistics(counter, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
