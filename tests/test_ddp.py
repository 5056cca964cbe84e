"""Several processes train as one: resident batches partition the global batch, and `lease bench ddp`
(torchrun with 2 CPU processes over gloo) keeps the ranks in step and in sync and tracks one process."""
import json

import pytest
import torch

from benchmarks.cli import main as bench_main
from benchmarks.train import results_table
from lease.data import ResidentBatches, TokenSet
from lease.typed_config import ConfigError

# On the CPU wherever the tests run; a small vocabulary and a high lr, so that the loss moves in 20 steps.
TINY_RUN = ["--preset", "tiny", "--batch-size", "32", "--steps", "20", "--dtype", "fp32", "--compile", "off",
            "--cpu", "optim.base_lr=1e-2", "model.vocab_gen=64"]


def test_ranks_share_out_the_single_process_batches():
    """At every step the ranks' batches together are the one-process batch of the same global size,
    across an epoch boundary too: the same images per step, whatever the process count."""
    n, per_rank, world = 40, 4, 2
    ids = torch.arange(n)
    tokens = TokenSet(ids[:, None].repeat(1, 3).to(torch.uint16), ids[:, None].repeat(1, 3).to(torch.uint16), ids, [])
    single = ResidentBatches(tokens, per_rank * world, torch.device("cpu"), seed=5).iterate(0)
    ranks = [ResidentBatches(tokens, per_rank, torch.device("cpu"), seed=5, rank=r, world_size=world).iterate(0)
             for r in range(world)]
    for _ in range(12):  # 5 steps per epoch
        parts = [next(r).labels for r in ranks]
        assert all(len(p) == per_rank for p in parts)
        assert sorted(torch.cat(parts).tolist()) == sorted(next(single).labels.tolist())


def test_bench_ddp_two_processes_track_one_and_one_under_torchrun_is_the_plain_process_exactly(tmp_path):
    """`--nproc 1 2`: the plain runs are shared, each count gets its record. Two gloo ranks track one
    process; torchrun with one process wraps the model in DDP and, with the plain process's seeds, masks
    and data, gives the same losses bit for bit on the CPU."""
    assert bench_main(["ddp", "--nproc", "1", "2", "--out-dir", str(tmp_path), "--work", str(tmp_path / "work"),
                       *TINY_RUN]) == 0
    two = json.loads((tmp_path / "ddp-tiny-b32-fp32-x2.json").read_text())["results"]
    assert two["ranks_by_step"] == {str(step): [0, 1] for step in range(1, 21)}
    assert two["ranks_in_sync"] and two["backend"] == "gloo"
    curves = two["curves"]
    assert all(len(c) == 20 for c in curves.values())
    assert all(min(c[-5:]) < c[0] - 0.1 for c in curves.values())  # every run learns
    # only masks and dropout differ from one process: far closer than a change of seed
    assert two["gap_torchrun_vs_one_process"] < 0.5 * two["gap_next_seed_vs_one_process"]
    assert (tmp_path / "ddp-tiny-b32-fp32-x2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "torchrun nproc 2 vs one process: tiny b32 fp32, 20 steps on planted tokens" in results_table(tmp_path)
    log = (tmp_path / "work" / "torchrun-2" / "train.log").read_text()
    assert "rank 0/2 step 20/20" in log and "rank 1/2 step 20/20" in log

    one = json.loads((tmp_path / "ddp-tiny-b32-fp32-x1.json").read_text())["results"]
    assert one["ranks_in_sync"] and one["ranks_by_step"] == {str(step): [0] for step in range(1, 21)}
    assert one["curves"]["torchrun, nproc 1"] == one["curves"]["one process"] == two["curves"]["one process"]
    assert one["gap_torchrun_vs_one_process"] == 0 < one["gap_next_seed_vs_one_process"]


@pytest.mark.parametrize("args, message", [
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--nproc", "3", "--batch-size", "32"], "does not split evenly"),
    (["--steps", "10"], "--steps must be >= 20"),
])
def test_bench_ddp_refuses_bad_arguments_before_any_work(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        bench_main(["ddp", "--preset", "tiny", "--cpu", "--work", str(tmp_path / "work"), *args])
    assert not (tmp_path / "work").exists()


def test_bench_ddp_names_a_bad_override_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="model.nosuch"):
        bench_main(["ddp", "--preset", "tiny", "--cpu", "--work", str(tmp_path / "work"), "model.nosuch=1"])
    assert not (tmp_path / "work").exists()
