"""Trainer behaviour: exact resume (also after a real signal, also under torchrun), NaN stop, bad
inputs, and learning on planted structure."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import get_args, get_type_hints

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from planted import write_shards

from lease.checkpoints import CheckpointError, load_checkpoint, model_from_checkpoint
from lease.configs import MaskConfig, TrainConfig, model_config, train_config
from lease.io import file_digest
from lease.launch import train_command
from lease.masking import random_plan
from lease.model import LeaseModel
from lease.synthetic import planted_codebook, planted_tokens
from lease.train import (
    NonFiniteLoss,
    compile_for_training,
    mark_row_counts_dynamic,
    train,
)
from lease.typed_config import to_dict

# Flat class preferences and many synonyms: the bag of generative codes alone separates classes
# only partly, so what training adds shows in the k-NN accuracy.
CLASSES, CONCEPTS, SYNONYMS, GRID, CONCENTRATION = 8, 24, 16, 8, 1.0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    vq, disc, labels = planted_tokens(1024, CLASSES, GRID * GRID, CONCEPTS, SYNONYMS, seed=0,
                                       concentration=CONCENTRATION)
    write_shards(root / "train", vq[:768], disc[:768], labels[:768], per_shard=256)
    write_shards(root / "val", vq[768:], disc[768:], labels[768:], per_shard=256, prefix="val")
    np.save(root / "codebook.npy", planted_codebook(CONCEPTS, 16, seed=1))
    return root


def tiny_cfg(root, **overrides):
    data = {"preset": "tiny", "batch_size": 64, "max_steps": 8, "log_every": 2, "ckpt_every": 4, "seed": 3,
            "model": {"vocab_gen": CONCEPTS * SYNONYMS, "grid_size": GRID, "embed_dim": 32, "num_heads": 2,
                      "decoder_embed_dim": 32, "decoder_num_heads": 2},
            "optim": {"warmup_epochs": 1.0, "base_lr": 1e-3},
            "data": {"shards": str(root / "train"), "codebook": str(root / "codebook.npy")}}
    for key, value in overrides.items():
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return train_config(data)


def assert_same_state(a: Path, b: Path) -> None:
    """The two runs' checkpoints hold the same step, bit-identical weights and Adam moments."""
    first, second = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert first["step"] == second["step"]
    for key, value in first["model"].items():
        assert torch.equal(value, second["model"][key]), key
    assert torch.equal(first["optimizer"]["state"][0]["exp_avg"], second["optimizer"]["state"][0]["exp_avg"])


def test_resume_is_exact(planted, tmp_path):
    straight = train(tiny_cfg(planted), tmp_path / "straight")
    first = train(tiny_cfg(planted), tmp_path / "split", stop_after=3)
    assert first["steps"] == 3 and not first["completed"]
    resumed = train(tiny_cfg(planted), tmp_path / "split", resume=True)
    assert resumed["steps"] == straight["steps"] == 8
    assert_same_state(tmp_path / "straight", tmp_path / "split")


def test_resume_reads_checkpoints_with_one_process_streams(planted, tmp_path):
    """Checkpoints written before the per-rank streams kept one process's at the top of "rng"."""
    straight = train(tiny_cfg(planted), tmp_path / "straight")
    train(tiny_cfg(planted), tmp_path / "split", stop_after=3)
    state = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    state["rng"] = {"mask_ratio": state["rng"]["mask_ratio"], **state["rng"]["ranks"][0]}
    torch.save(state, tmp_path / "split" / "checkpoint.pt")
    assert train(tiny_cfg(planted), tmp_path / "split", resume=True)["steps"] == straight["steps"]
    assert_same_state(tmp_path / "straight", tmp_path / "split")


def metric_rows(out: Path) -> list[dict]:
    """metrics.jsonl without the timing column (the one thing a resumed run may log differently)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in rows]


def tensorboard_losses(out: Path) -> list[tuple[int, float]]:
    """(step, loss) as TensorBoard shows them: events purged by a later file's purge_step are gone."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def test_metrics_after_a_resume_equal_a_straight_run(planted, tmp_path):
    """A process killed after logging step 6 leaves its checkpoint at step 4 (ckpt_every=4) and maybe a
    torn line: the resumed run logs steps 5 and 6 again, and its record must equal a straight run's."""
    cfg = tiny_cfg(planted, log_every=1)
    train(cfg, tmp_path / "straight")
    split = tmp_path / "split"
    train(cfg, split, stop_after=4)
    shutil.copy(split / "checkpoint.pt", tmp_path / "step4.pt")
    train(cfg, split, resume=True, stop_after=6)
    os.replace(tmp_path / "step4.pt", split / "checkpoint.pt")
    with (split / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 7, "loss": 1.')
    train(cfg, split, resume=True)
    assert [row["step"] for row in metric_rows(split)] == list(range(1, 9))
    assert metric_rows(split) == metric_rows(tmp_path / "straight")
    assert tensorboard_losses(split) == tensorboard_losses(tmp_path / "straight")
    assert [step for step, _ in tensorboard_losses(split)] == list(range(1, 9))


def launch_training(cfg: TrainConfig, out: Path, *args: str, nproc: int | None = None) -> subprocess.Popen:
    """`lease train` in its own process (or `nproc` under torchrun), as a user starts it; its output
    goes to out's sibling `<name>.log`."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    # One thread each, as torchrun sets it (runs side by side share the cores), and the CPU even on a
    # GPU machine: its kernels repeat bit for bit, and torchrun's ranks need no GPU each.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with (out.parent / f"{out.name}.log").open("w") as log:
        return subprocess.Popen([*train_command(config, out, nproc), *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)


def finish(proc: subprocess.Popen, out: Path, timeout: float = 240) -> str:
    """Wait for `proc`; fail (killing it) when it hangs or exits non-zero. Returns its output."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
        proc.wait()
        pytest.fail(f"hung for {timeout} s:\n{(out.parent / f'{out.name}.log').read_text()[-3000:]}")
    output = (out.parent / f"{out.name}.log").read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{output[-3000:]}"
    return output


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # complete lines only
    return [json.loads(line)["step"] for line in lines]


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in logged_steps(out)):
        assert proc.poll() is None, f"training exited (code {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.02)


def worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=`rank` (Linux /proc)."""
    pending = [launcher_pid]
    while pending:
        pid = pending.pop()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in map(int, children):
            if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
                return child
            pending.append(child)
    raise AssertionError(f"no torchrun worker with RANK={rank}")


SIGNAL_RUN = {"max_steps": 40, "ckpt_every": 1000}  # the only checkpoint is the one the signal writes


@pytest.fixture(scope="module")
def straight_run(planted, tmp_path_factory):
    """The uninterrupted single-process run the interrupted ones must end at."""
    out = tmp_path_factory.mktemp("straight") / "run"
    finish(launch_training(tiny_cfg(planted, log_every=1, **SIGNAL_RUN), out), out)
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_resume_is_exact(planted, straight_run, tmp_path, sig):
    cfg = tiny_cfg(planted, log_every=1, **SIGNAL_RUN)
    interrupted = launch_training(cfg, tmp_path / "interrupted")
    wait_for_step(interrupted, tmp_path / "interrupted", 2)
    interrupted.send_signal(sig)
    output = finish(interrupted, tmp_path / "interrupted")
    stopped_at = load_checkpoint(tmp_path / "interrupted" / "checkpoint.pt")["step"]
    assert f"signal {sig.name}: saving a checkpoint and stopping" in output
    assert f"stopped at step {stopped_at} of 40" in output and '"completed": false' in output
    assert stopped_at == logged_steps(tmp_path / "interrupted")[-1] < 40
    finish(launch_training(cfg, tmp_path / "interrupted", "--resume"), tmp_path / "interrupted")
    assert_same_state(straight_run, tmp_path / "interrupted")
    assert metric_rows(tmp_path / "interrupted") == metric_rows(straight_run)


def test_torchrun_ranks_stop_together_and_resume_exactly(planted, tmp_path):
    """A signal that reaches one rank only (here rank 1) stops both at the same step: alone, rank 1
    would leave rank 0 waiting in its next all-reduce. The checkpoint holds each rank's own mask and
    dropout streams, so two processes resume to the uninterrupted run's weights bit for bit; one
    process resumes it too, with fresh streams and a warning."""
    cfg = tiny_cfg(planted, log_every=4, **SIGNAL_RUN)
    straight = launch_training(cfg, tmp_path / "straight", nproc=2)
    interrupted = launch_training(cfg, tmp_path / "interrupted", nproc=2)
    wait_for_step(interrupted, tmp_path / "interrupted", 4)
    os.kill(worker_pid(interrupted.pid, rank=1), signal.SIGTERM)
    output = finish(interrupted, tmp_path / "interrupted")
    state = load_checkpoint(tmp_path / "interrupted" / "checkpoint.pt")
    stopped_at = state["step"]
    assert stopped_at < 40 and stopped_at % 4 == 0
    assert f"rank 0/2 step {stopped_at}/40" in output and f"rank 1/2 step {stopped_at}/40" in output
    assert f"step {stopped_at + 4}/40" not in output
    assert len(state["rng"]["ranks"]) == 2
    assert not torch.equal(state["rng"]["ranks"][0]["mask_perm"], state["rng"]["ranks"][1]["mask_perm"])
    shutil.copytree(tmp_path / "interrupted", tmp_path / "one-process")
    finish(launch_training(cfg, tmp_path / "interrupted", "--resume", nproc=2), tmp_path / "interrupted")
    finish(straight, tmp_path / "straight")
    assert_same_state(tmp_path / "straight", tmp_path / "interrupted")
    resumed_alone = finish(launch_training(cfg, tmp_path / "one-process", "--resume"), tmp_path / "one-process")
    assert "checkpoint written by 2 processes, resumed by 1" in resumed_alone
    assert load_checkpoint(tmp_path / "one-process" / "checkpoint.pt")["step"] == 40


def test_metrics_and_export_written(planted, tmp_path):
    result = train(tiny_cfg(planted), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # log_every 2, but 8 steps are too few for it: the curve keeps MIN_LOGGED_STEPS (8) points
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert (tmp_path / "run" / "export" / "encoder.safetensors").is_file()
    model = model_from_checkpoint(result["checkpoint"])
    assert model.cfg.vocab_gen == CONCEPTS * SYNONYMS and model.codebook_size == CONCEPTS


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(planted, tmp_path):
    train(tiny_cfg(planted, max_steps=4), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    digest = file_digest(ckpt)
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        train(tiny_cfg(planted, **{"max_steps": 8, "optim.base_lr": 1e35, "optim.warmup_epochs": 0.0}),
              tmp_path / "run", resume=True)
    assert file_digest(ckpt) == digest


def test_token_ids_out_of_range_are_named(planted, tmp_path):
    with pytest.raises(ValueError, match="vocab_gen"):
        train(tiny_cfg(planted, **{"model.vocab_gen": 16}), tmp_path / "run")


def test_codebook_smaller_than_ids_is_named(planted, tmp_path):
    np.save(tmp_path / "small.npy", planted_codebook(CONCEPTS - 4, 16, seed=1))
    with pytest.raises(ValueError, match="codebook has K"):
        train(tiny_cfg(planted, **{"data.codebook": str(tmp_path / "small.npy")}), tmp_path / "run")


def test_resume_without_checkpoint_is_clear(planted, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        train(tiny_cfg(planted), tmp_path / "nothing", resume=True)


def test_compiled_model_keeps_one_graph_across_masking_ratios():
    """Under `torch.compile` the decoded and contrast row counts change from step to step, and the
    trainer marks them dynamic so that one graph serves every ratio. The ratios here cover contrast
    rows at full width (ratio near its minimum), where a slice of the kept rows would be contiguous and
    any other width's would not: that flip alone recompiled the whole step."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    cfg = model_config("tiny", codebook_dim=16)
    model = LeaseModel(cfg).train()
    model.set_codebook(torch.randn(32, 16))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")  # graphs as inductor gets them, without codegen
    length = cfg.seq_len
    contrast_widths = set()
    for num_masked in (length * 3 // 4, length // 2 + 1, length - 1, length * 5 // 8):
        plan = random_plan(4, length, length // 2, num_masked, torch.device("cpu"), None,
                           MaskConfig().decode_rows_multiple)
        mark_row_counts_dynamic(plan)
        contrast_widths.add(plan.contrast_idx.shape[1])
        compiled(torch.randint(0, cfg.vocab_gen, (4, length)), torch.randint(0, 32, (4, length)), plan).loss.backward()
    assert length // 2 in contrast_widths and len(contrast_widths) == 4
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("mode", get_args(get_type_hints(TrainConfig)["compile_mode"]))
def test_training_compile_options_are_known_to_inductor(mode):
    """`torch.compile` checks option names when it wraps, before any step: a torch that renamed one of
    `TRAINING_INDUCTOR_OPTIONS` (or a mode) fails here on the CPU, not at the first step of a GPU job."""
    compile_for_training(torch.nn.Linear(2, 2), mode)


def _knn_accuracy(model, train_set, val_set, k=10):
    with torch.no_grad():
        f_train = F.normalize(model.eval().features(train_set.vq.long()), dim=-1)
        f_val = F.normalize(model.features(val_set.vq.long()), dim=-1)
    sims, idx = (f_val @ f_train.T).topk(k, dim=-1)
    votes = torch.zeros(len(f_val), CLASSES).scatter_add_(1, train_set.labels[idx], (sims / 0.07).exp())
    return (votes.argmax(-1) == val_set.labels).float().mean().item()


def test_the_pipeline_launches_torchrun_as_a_user_would(planted, tmp_path, monkeypatch):
    """The pretrain stage's launcher (pretrain.nproc_per_node=2) trains to the weights of the same config
    run by hand under torchrun, with both ranks in sync (gloo, CPU)."""
    from lease.launch import run_torchrun, runs_distributed

    cfg = tiny_cfg(planted, nproc_per_node=2)
    assert runs_distributed(cfg) and not runs_distributed(tiny_cfg(planted, nproc_per_node=1))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    by_hand = launch_training(cfg, tmp_path / "by-hand", nproc=2)
    result = run_torchrun(cfg, tmp_path / "stage", resume=False)
    finish(by_hand, tmp_path / "by-hand")
    assert result["completed"] and result["world_size"] == 2 and result["ranks_in_sync"]
    assert_same_state(tmp_path / "by-hand", tmp_path / "stage")
