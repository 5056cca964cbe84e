"""Codebook statistics: entropies on hand-made distributions, utilisation, sparse = dense, the plot."""
import json
import math

import numpy as np
import pytest

from pipeline import stats as st


def test_independent_pairs_give_unconditional_entropies():
    # Every (g, d) pair exactly once: G and D independent and uniform.
    g, d = np.meshgrid(np.arange(8), np.arange(4), indexing="ij")
    s = st.token_statistics(g.astype(np.uint16), d.astype(np.uint16), vocab_gen=8, codebook_size=4)
    ent = s["entropy_nats"]
    assert ent["gen"] == pytest.approx(math.log(8)) and ent["disc"] == pytest.approx(math.log(4))
    assert ent["gen_given_disc"] == pytest.approx(ent["gen"])
    assert ent["disc_given_gen"] == pytest.approx(ent["disc"])
    assert ent["mutual_information"] == pytest.approx(0.0, abs=1e-12)
    assert s["per_token_conditional_entropy"]["gen_given_disc"]["mean"] == pytest.approx(math.log(8))


def test_deterministic_mapping_has_zero_conditional_entropy():
    rng = np.random.default_rng(0)
    g = rng.integers(0, 16, size=(50, 64))
    d = g // 4  # disc is a function of gen: four gen codes per disc id
    ent = st.token_statistics(g, d, vocab_gen=16, codebook_size=4)["entropy_nats"]
    assert ent["disc_given_gen"] == pytest.approx(0.0, abs=1e-12)
    assert ent["gen_given_disc"] == pytest.approx(ent["gen"] - ent["disc"])
    assert ent["mutual_information"] == pytest.approx(ent["disc"])


def test_hand_computed_conditional_entropy():
    # d=0 co-occurs with g=0 twice and g=1 twice; d=1 only with g=2 (4 times).
    g = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    d = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = st.token_statistics(g, d, vocab_gen=4, codebook_size=3)
    # H(G|D) = 0.5 * log 2 + 0.5 * 0
    assert s["entropy_nats"]["gen_given_disc"] == pytest.approx(0.5 * math.log(2))
    assert s["entropy_nats"]["disc_given_gen"] == pytest.approx(0.0, abs=1e-12)
    per = st.per_token_conditional_entropy(np.array([0, 0, 1]), np.array([4.0, 4.0, 8.0]), 3)
    np.testing.assert_allclose(per[:2], [math.log(2), 0.0])
    assert np.isnan(per[2])  # never seen


def test_utilisation_and_histograms():
    g = np.array([[0, 0, 3, 3, 3, 5]], dtype=np.uint16)
    d = np.array([[1, 1, 1, 1, 2, 2]], dtype=np.uint16)
    s = st.token_statistics(g, d, vocab_gen=8, codebook_size=10)
    assert s["codebook_utilisation"] == {"gen": 3 / 8, "disc": 2 / 10}
    assert s["codes_used"] == {"gen": 3, "disc": 2}
    assert s["histograms"]["gen"] == [2, 0, 0, 3, 0, 1, 0, 0]
    assert s["histograms"]["disc"] == [0, 4, 2] + [0] * 7
    assert (s["num_images"], s["num_tokens"]) == (1, 6)
    assert s["perplexity"]["disc"] == pytest.approx(math.exp(s["entropy_nats"]["disc"]))


def test_sparse_counts_equal_dense_counts_over_several_updates():
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 32, (20, 16)), rng.integers(0, 50, (20, 16))) for _ in range(3)]
    dense, sparse = st.JointCounter(32, 50), st.JointCounter(32, 50, dense_limit=0)
    assert dense.dense is not None and sparse.dense is None
    for g, d in batches:
        dense.update(g, d)
        sparse.update(g, d)
    for a, b in zip(dense.nonzero(), sparse.nonzero()):
        np.testing.assert_array_equal(a, b)
    assert dense.statistics()[0] == sparse.statistics()[0]
    assert dense.num_images == 60


def test_bad_tokens_are_rejected():
    with pytest.raises(ValueError, match="vq tokens span"):
        st.token_statistics(np.array([[0, 9]]), np.array([[0, 1]]), vocab_gen=8, codebook_size=4)
    with pytest.raises(ValueError, match="disc tokens span"):
        st.token_statistics(np.array([[0, 1]]), np.array([[0, 4]]), vocab_gen=8, codebook_size=4)
    with pytest.raises(ValueError, match="position-aligned"):
        st.token_statistics(np.zeros((2, 3)), np.zeros((2, 4)), vocab_gen=8, codebook_size=4)


def test_write_statistics_writes_json_and_png(tmp_path):
    rng = np.random.default_rng(2)
    counter = st.JointCounter(64, 32)
    counter.update(rng.integers(0, 64, (10, 16)), rng.integers(0, 20, (10, 16)))
    stats = st.write_statistics(counter, tmp_path, extra={"splits": {"train": 10}})
    png = (tmp_path / "token_usage.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    on_disk = json.loads((tmp_path / "stats.json").read_text())
    assert on_disk == json.loads(json.dumps(stats))
    assert on_disk["splits"] == {"train": 10} and on_disk["codebook_utilisation"]["disc"] <= 20 / 32


def test_cli_reads_packed_shards(tmp_path):
    from lease.synthetic import planted_tokens
    from planted import write_shards

    vq, disc, labels = planted_tokens(24, num_classes=3, seq_len=16, concepts=8, synonyms=4, seed=0)
    write_shards(tmp_path / "shards", vq, disc, labels, per_shard=10)
    assert st.main(["--shards", str(tmp_path / "shards"), "--vocab-gen", "32", "--codebook-size", "8",
                    "--out", str(tmp_path / "out")]) == 0
    ent = json.loads((tmp_path / "out" / "stats.json").read_text())["entropy_nats"]
    # Each gen code is a synonym of exactly one concept: knowing gen fixes disc.
    assert ent["disc_given_gen"] == pytest.approx(0.0, abs=1e-12)
    assert ent["gen_given_disc"] == pytest.approx(math.log(4), abs=0.1)
