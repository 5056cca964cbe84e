"""k-means codebook and nearest-centroid assignment: exactness, determinism, outputs, bad inputs."""
import json

import numpy as np
import pytest
import torch

from benchmarks.codebook import time_assign, time_kmeans
from pipeline import kmeans as km
from pipeline.assign import Assigner, nearest_centroid


def brute_force(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d2 = ((x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None]) ** 2).sum(-1)
    return d2.argmin(1), d2.min(1)


def blobs(n: int, d: int, modes: int, seed: int, spread: float = 4.0, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(modes, d)) * spread + offset
    return (centres[rng.integers(0, modes, n)] + rng.normal(size=(n, d))).astype(np.float32)


# ------------------------------------------------------------------------------------------ assign


@pytest.mark.parametrize("chunk", [7, None])
def test_nearest_centroid_equals_brute_force(chunk):
    x = blobs(600, 24, 10, seed=0, offset=30.0)
    c = np.random.default_rng(1).normal(size=(50, 24)).astype(np.float32) * 4 + 30.0
    expected, _ = brute_force(x, c)
    ids = nearest_centroid(torch.from_numpy(x), torch.from_numpy(c), chunk=chunk)
    assert ids.dtype == torch.int64 and ids.shape == (600,)
    np.testing.assert_array_equal(ids.numpy(), expected)


def test_assigner_keeps_leading_dims_and_returns_exact_distances():
    x = blobs(4 * 32, 16, 6, seed=2).reshape(4, 32, 16)
    c = blobs(20, 16, 6, seed=3)
    ids, d2 = Assigner(torch.from_numpy(c), chunk=13).assign(torch.from_numpy(x), return_distances=True)
    expected, expected_d2 = brute_force(x.reshape(-1, 16), c)
    assert ids.shape == (4, 32) and d2.shape == (4, 32)
    np.testing.assert_array_equal(ids.reshape(-1).numpy(), expected)
    np.testing.assert_allclose(d2.reshape(-1).numpy(), expected_d2, rtol=1e-4, atol=1e-3)


def test_bf16_shortlist_reranking_recovers_the_exact_answer():
    # Close calls: every point sits near the midpoint of two centroids. bf16 scores alone get some
    # rows wrong; re-ranking the default shortlist in fp32 must give the brute-force answer.
    rng = np.random.default_rng(4)
    c = rng.normal(size=(128, 64)).astype(np.float32)
    a, b = rng.integers(0, 128, 2000), rng.integers(0, 128, 2000)
    x = (0.5 * (c[a] + c[b]) + 0.05 * rng.normal(size=(2000, 64))).astype(np.float32)
    expected, expected_d2 = brute_force(x, c)
    rough = Assigner(torch.from_numpy(c), matmul_dtype="bf16", shortlist=1).assign(torch.from_numpy(x))
    assigner = Assigner(torch.from_numpy(c), matmul_dtype="bf16")
    ids, d2 = assigner.assign(torch.from_numpy(x), return_distances=True)
    assert assigner.shortlist > 1
    assert (rough.numpy() != expected).sum() > 0  # the shortlist is doing real work here
    np.testing.assert_array_equal(ids.numpy(), expected)
    np.testing.assert_allclose(d2.numpy(), expected_d2, rtol=1e-4)


def test_assigner_rejects_bad_inputs():
    c = torch.randn(8, 4)
    with pytest.raises(ValueError, match="D=5 but the codebook has D=4"):
        Assigner(c).assign(torch.randn(3, 5))
    with pytest.raises(ValueError, match="shortlist"):
        Assigner(c, shortlist=9)
    with pytest.raises(ValueError, match="centroids must be"):
        Assigner(torch.randn(8))
    with pytest.raises(ValueError, match="matmul dtype"):
        Assigner(c, matmul_dtype="fp8")


def test_time_assign_reports_agreement():
    out = time_assign(n=500, d=16, k=32, device="cpu", repeats=1, check_rows=200)
    assert out["agreement_with_fp64"] == 1.0 and out["seconds_median"] > 0 and out["n"] == 500


# ------------------------------------------------------------------------------------------ kmeans


def test_choose_backend():
    assert km.choose_backend("auto", torch.device("cpu")) == "faiss"
    assert km.choose_backend("torch", torch.device("cpu")) == "torch"
    expected_cuda = "faiss" if km.faiss_gpu_count() > 0 else "torch"
    assert km.choose_backend("auto", torch.device("cuda")) == expected_cuda
    with pytest.raises(ValueError, match="backend"):
        km.choose_backend("sklearn", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_kmeans_deterministic_and_consistent(backend):
    x = blobs(1200, 8, 12, seed=5)
    a = km.train_kmeans(x, 12, 8, seed=3, backend=backend, device="cpu", progress=False)
    b = km.train_kmeans(torch.from_numpy(x), 12, 8, seed=3, backend=backend, device="cpu", progress=False)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.centroids.shape == (12, 8) and a.centroids.dtype == np.float32
    assert len(a.inertia) == 8 and a.sizes.sum() == 1200
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(a.inertia, a.inertia[1:]))
    ids, d2 = brute_force(x, a.centroids)
    np.testing.assert_array_equal(a.sizes, np.bincount(ids, minlength=12))
    assert a.final_inertia == pytest.approx(d2.sum(), rel=1e-4)
    assert a.final_inertia <= a.inertia[-1] * (1 + 1e-6)
    other = km.train_kmeans(x, 12, 8, seed=4, backend=backend, device="cpu", progress=False)
    assert not np.array_equal(other.centroids, a.centroids)


def test_torch_kmeans_one_lloyd_step_matches_numpy():
    x = blobs(400, 6, 5, seed=6)
    result = km.train_kmeans(x, 5, 1, seed=7, backend="torch", device="cpu", progress=False)
    start = x[km.initial_indices(400, 5, 7).numpy()]
    ids, d2 = brute_force(x, start)
    expected = np.stack([x[ids == j].mean(0) for j in range(5)])
    np.testing.assert_allclose(result.centroids, expected, rtol=1e-5, atol=1e-5)
    assert result.inertia[0] == pytest.approx(d2.sum(), rel=1e-5)


def test_empty_clusters_move_to_far_points():
    centroids = torch.zeros(4, 2)
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [9.0, 9.0], [5.0, 5.0]])
    sq_dists = torch.tensor([0.0, 1.0, 162.0, 50.0])
    counts = torch.tensor([3, 0, 1, 0])
    assert km.reseed_empty(centroids, counts, features, sq_dists) == 2
    torch.testing.assert_close(centroids[1], features[2])
    torch.testing.assert_close(centroids[3], features[3])
    torch.testing.assert_close(centroids[[0, 2]], torch.zeros(2, 2))


def test_kmeans_with_duplicate_points_reseeds_and_ends_without_empty_clusters():
    rng = np.random.default_rng(8)
    x = np.concatenate([np.zeros((80, 3)), rng.normal(size=(40, 3)) + 20]).astype(np.float32)
    result = km.train_kmeans(x, 4, 5, seed=0, backend="torch", device="cpu", progress=False)
    assert result.empty_reseeded >= 1  # several initial centroids sit on the 80 identical points
    assert (result.sizes > 0).all()


def test_kmeans_rejects_bad_arguments():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(ValueError, match="sample more images"):
        km.train_kmeans(x, 11, 2, device="cpu")
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        km.train_kmeans(np.zeros(10, np.float32), 2, 2, device="cpu")
    with pytest.raises(ValueError, match="iters"):
        km.train_kmeans(x, 2, 0, device="cpu")


# ----------------------------------------------------------------------------------------- outputs


def test_outputs_written_with_neighbour_table(tmp_path):
    x = blobs(500, 8, 10, seed=9)
    result = km.train_kmeans(x, 10, 4, seed=0, backend="torch", device="cpu", progress=False)
    km.write_kmeans_outputs(result, tmp_path, num_neighbours=3, iters=4, seed=0, device="cpu")
    np.testing.assert_array_equal(np.load(tmp_path / "centroids.npy"), result.centroids)
    np.testing.assert_array_equal(np.load(tmp_path / "sizes.npy"), result.sizes)
    with np.load(tmp_path / "neighbours.npz") as table:
        index, similarity = table["index"], table["similarity"]
    assert index.shape == similarity.shape == (10, 4)
    np.testing.assert_array_equal(index[:, 0], np.arange(10))
    unit = result.centroids / np.linalg.norm(result.centroids, axis=1, keepdims=True)
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, -np.inf)
    np.testing.assert_array_equal(index[:, 1], cosine.argmax(1))
    np.testing.assert_allclose(similarity[:, 1], cosine.max(1), rtol=1e-5)
    info = json.loads((tmp_path / "kmeans.json").read_text())
    assert (info["k"], info["d"], info["n"], info["iters"], info["backend"]) == (10, 8, 500, 4, "torch-cpu")
    assert info["inertia"] == result.inertia and info["empty_reseeded"] == result.empty_reseeded
    assert not list(tmp_path.glob(".*.tmp"))


def test_existing_codebook_is_adopted(tmp_path):
    codebook = blobs(16, 8, 4, seed=10)
    np.save(tmp_path / "km_16k.npy", codebook)
    features = blobs(300, 8, 4, seed=11)
    info = km.use_existing_codebook(tmp_path / "km_16k.npy", tmp_path / "out", 2, features, device="cpu")
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "centroids.npy"), codebook)
    ids, _ = brute_force(features, codebook)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "sizes.npy"), np.bincount(ids, minlength=16))
    assert info["backend"] == "file" and info["k"] == 16 and len(info["source_sha256"]) == 64


def test_cli_trains_from_a_feature_file_with_sampling(tmp_path):
    np.save(tmp_path / "features.npy", blobs(2 * 150, 6, 5, seed=12).reshape(2, 150, 6).astype(np.float16))
    assert km.main(["train", "--features", str(tmp_path / "features.npy"), "--out", str(tmp_path / "cb"),
                    "--k", "5", "--iters", "3", "--sample-size", "200", "--device", "cpu",
                    "--num-neighbours", "2"]) == 0
    info = json.loads((tmp_path / "cb" / "kmeans.json").read_text())
    assert (info["k"], info["n"], info["num_neighbours"]) == (5, 200, 2)
    assert np.load(tmp_path / "cb" / "neighbours.npz")["index"].shape == (5, 3)
    with pytest.raises(SystemExit):
        km.main(["train", "--out", str(tmp_path / "none")])


def test_feature_sample_is_seeded(tmp_path):
    np.save(tmp_path / "f.npy", np.arange(40 * 3, dtype=np.float32).reshape(4, 10, 3))
    a = km.load_feature_sample(tmp_path / "f.npy", 15, seed=1)
    b = km.load_feature_sample(tmp_path / "f.npy", 15, seed=1)
    assert a.shape == (15, 3) and np.array_equal(a, b)
    assert len(np.unique(a[:, 0])) == 15
    assert km.load_feature_sample(tmp_path / "f.npy", None, seed=1).shape == (40, 3)
    with pytest.raises(FileNotFoundError, match="feature-sample"):
        km.load_feature_sample(tmp_path / "missing.npy", None, seed=1)


def test_time_kmeans_on_synthetic_data():
    out = time_kmeans(n=600, d=8, k=6, iters=2, device="cpu", backend="torch")
    assert out["backend"] == "torch-cpu" and out["seconds"] > 0 and out["inertia_last"] <= out["inertia_first"]
