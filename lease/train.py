"""LEASE pretraining loop: AdamW + warm-up/cosine, bf16 autocast, grad accumulation, DDP, exact resume.

Run with `lease train --config ...` (one process) or `torchrun --nproc_per_node=N -m lease.train ...`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lease import stopping
from lease.checkpoints import export_encoder, load_checkpoint, save_checkpoint
from lease.cli_help import show_defaults
from lease.codebook import load_codebook
from lease.configs import AUTHORS_EMA_EPOCHS, TrainConfig, train_config
from lease.data import Batch, ResidentBatches, StreamingBatches, fits_on_device, read_token_set, resolve_shards
from lease.io import atomic_path
from lease.masking import (EchoPlan, MaskPlan, MaskRatioSampler, num_dropped_tokens, num_masked_tokens,
                           random_echo_plan, random_plan)
from lease.model import LeaseModel, describe
from lease.online import ImageBatch, OnlineTokenizer, online_inputs
from lease.sorcen import ema_beta
from lease.typed_config import apply_overrides, load_yaml, to_dict

log = logging.getLogger(__name__)
METRICS = ("loss", "rec_loss", "contrast_loss", "uniformity_loss", "classifier_acc", "grad_norm")
MIN_LOGGED_STEPS = 8  # the fewest points of a loss curve, however short the run (see Trainer.log_every)


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is left untouched."""


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False  # launched by torchrun: a process group and DDP, even for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def setup_distributed() -> Dist:
    """One process per GPU under torchrun (which sets `TORCHRUN_ENV`), DDP even with one process; a
    plain single process otherwise."""
    if not all(key in os.environ for key in TORCHRUN_ENV):
        return Dist()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))  # NCCL knows its GPU
    else:
        dist.init_process_group("gloo")
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, distributed=True)


def pick_device(ddp: Dist) -> torch.device:
    return torch.device("cuda", ddp.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.dtype == "fp32" or (cfg.dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """MAE's grouping: no weight decay on biases, norm weights and other 1-D parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """Per-step linear warm-up, then half-cosine decay to `min_lr`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_model(cfg: TrainConfig, centroids: torch.Tensor | None, num_classes: int = 0) -> LeaseModel:
    """The model for `cfg`, its codebook dimension read from the centroids."""
    model_cfg = cfg.model
    if model_cfg.contrast_on != "none":
        if centroids is None:
            raise ValueError(f"model.contrast_on={model_cfg.contrast_on!r} needs data.codebook")
        model_cfg.codebook_dim = centroids.shape[1]
    if model_cfg.num_classes == -1:  # "from the data": known only for a resident token set
        model_cfg.num_classes = max(num_classes, 0)
    model = LeaseModel(model_cfg, cfg.loss)
    if centroids is not None:
        model.set_codebook(centroids)
    return model


def mark_row_counts_dynamic(plan: MaskPlan) -> None:
    """The decoded and contrast row counts change from step to step: one compiled graph for all."""
    torch._dynamo.maybe_mark_dynamic(plan.decode_idx, 1)
    torch._dynamo.maybe_mark_dynamic(plan.contrast_idx, 1)


# Inductor's comprehensive padding rounds the strides of some intermediate buffers up to 128 bytes. In
# torch 2.11 on CUDA a fused reduction then indexed an unpadded buffer with the padded stride (the same
# mechanism as pytorch/pytorch#179931): the [CLS] row of split_cls got dq and dk 150 % off, or NaN, and
# only turning this pass off made that graph right. Off, the ViT-B step runs as fast (README).
TRAINING_INDUCTOR_OPTIONS = {"comprehensive_padding": False}


def compile_for_training(fn: Any, mode: str, dynamic: bool | None = None) -> Any:
    """`torch.compile(fn, mode=mode)` with `TRAINING_INDUCTOR_OPTIONS` on top of the mode's own options."""
    options = {**torch._inductor.list_mode_options(mode), **TRAINING_INDUCTOR_OPTIONS}
    return torch.compile(fn, dynamic=dynamic, options=options)


class Trainer:
    """Owns model, optimizer, RNG streams and the step counter; `step()` runs one optimizer step."""

    def __init__(self, cfg: TrainConfig, model: LeaseModel, device: torch.device, ddp: Dist,
                 steps_per_epoch: int, online: OnlineTokenizer | None = None):
        """`online` (method mage_online) turns each step's image batch into codes inside the step."""
        self.cfg, self.device, self.ddp, self.online = cfg, device, ddp, online
        self.model = model.to(device)
        self.dtype = autocast_dtype(cfg, device)
        self.micro_batch = cfg.batch_size // (ddp.world_size * cfg.grad_accum)
        if self.micro_batch == 0:
            raise ValueError(f"batch_size={cfg.batch_size} is smaller than world_size*grad_accum")
        self.peak_lr = cfg.optim.base_lr * cfg.batch_size / 256
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.max_steps or int(cfg.epochs * steps_per_epoch)
        self.warmup_steps = max(1, int(cfg.optim.warmup_epochs * steps_per_epoch))
        # a run too short for `log_every` still logs a loss curve of MIN_LOGGED_STEPS points
        self.log_every = min(cfg.log_every, max(1, self.total_steps // MIN_LOGGED_STEPS))
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.optim.weight_decay), lr=self.peak_lr,
                                           betas=cfg.optim.betas, fused=device.type == "cuda")
        self.ratio_sampler = MaskRatioSampler(cfg.mask, seed=cfg.seed)
        self.mask_gen = torch.Generator(device=device)
        self._seed_rank_streams(cfg.seed)
        self.num_dropped = num_dropped_tokens(model.cfg.seq_len, cfg.mask)
        self.step_count = 0
        self.lr = 0.0
        wrapped = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None
                                          ) if ddp.distributed else self.model
        self.forward = compile_for_training(wrapped, cfg.compile_mode) if cfg.compile else wrapped
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    # ------------------------------------------------------------------------------ one step
    def autocast(self) -> torch.autocast:
        """bf16/fp16 autocast on the GPU, a no-op in fp32."""
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def plan_at_mean_ratio(self, batch: int, generator: torch.Generator | None = None) -> MaskPlan:
        """A mask plan for `batch` images at the ratio law's mean: for measuring, not for training."""
        seq_len = self.model.cfg.seq_len
        num_masked = num_masked_tokens(seq_len, self.ratio_sampler.mean())
        plan = random_plan(batch, seq_len, self.num_dropped, num_masked, self.device, generator,
                           self.cfg.mask.decode_rows_multiple)
        if self.model.cfg.echo_contrast:
            plan.echo = self.echo_plan(batch, generator)
        return plan

    def echo_plan(self, batch: int, generator: torch.Generator | None) -> EchoPlan:
        """Sorcen's random choices for `batch` images (the echo of the true tokens in the first epochs)."""
        return random_echo_plan(batch, self.model.cfg.grid_size, self.cfg.loss.echo_crop_min,
                                self.cfg.loss.echo_crop_max, self.device, generator,
                                from_truth=self.epoch < self.cfg.ema.echo_from_truth_epochs)

    def _micro_batches(self, batch: Batch) -> Iterator[Batch]:
        for i in range(self.cfg.grad_accum):
            sl = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
            yield Batch(batch.vq[sl], None if batch.disc is None else batch.disc[sl], batch.labels[sl])

    def step(self, batch: Batch | ImageBatch) -> dict[str, torch.Tensor]:
        """One optimizer step over `batch` (this rank's share; images for mage_online, whose augmentation
        draws from the mask stream); metrics stay on the device."""
        if self.online is not None:
            batch = self.online.tokenize(batch, self.mask_gen)
        lr = lr_at(self.step_count, self.peak_lr, self.warmup_steps, self.total_steps, self.cfg.optim.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ratio = float(self.ratio_sampler.sample(1))  # one ratio per step (same on every rank: same seed)
        num_masked = num_masked_tokens(self.model.cfg.seq_len, ratio)
        echo = self.model.cfg.echo_contrast
        if echo:  # Sorcen: the teacher's EMA step before the forward, at the epoch the step count gives
            self.model.ema_update(ema_beta(self.epoch, self.cfg.ema.base, self.ema_horizon))
        names = ("loss", "rec_loss", "contrast_loss") + (("uniformity_loss",) if echo else ()) + (
            ("classifier_acc",) if self.model.online_classifier is not None else ())
        sums = {k: torch.zeros((), device=self.device) for k in names}
        for i, micro in enumerate(self._micro_batches(batch)):
            plan = random_plan(micro.vq.shape[0], micro.vq.shape[1], self.num_dropped, num_masked,
                               self.device, self.mask_gen, self.cfg.mask.decode_rows_multiple)
            if echo:
                plan.echo = self.echo_plan(micro.vq.shape[0], self.mask_gen)
            if self.cfg.compile:
                mark_row_counts_dynamic(plan)
            reads_labels = self.model.online_classifier is not None or self.model.reads_labels
            labels = micro.labels if reads_labels else None
            sync = contextlib.nullcontext() if (i == self.cfg.grad_accum - 1 or not self.ddp.distributed) \
                else self.forward.no_sync()
            with sync, self.autocast():
                out = self.forward(micro.vq, micro.disc, plan, labels)
                (out.backward_loss() / self.cfg.grad_accum).backward()
            for key in ("loss", "rec_loss", "contrast_loss", "uniformity_loss"):
                if key in sums:
                    sums[key] += getattr(out, key).detach().float() / self.cfg.grad_accum
            if out.classifier_acc is not None:
                sums["classifier_acc"] += out.classifier_acc.detach() / self.cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._nonfinite |= ~torch.isfinite(sums["loss"])
        self.step_count += 1
        self.lr = lr
        return {**sums, "grad_norm": grad_norm.detach().float()}

    @property
    def epoch(self) -> float:
        """Epochs done before this step, from the step count (fractional)."""
        return self.step_count / self.steps_per_epoch

    @property
    def ema_horizon(self) -> float:
        """E of Sorcen's β schedule: the run's length in epochs, or the authors' constant."""
        return self.total_steps / self.steps_per_epoch if self.cfg.ema.horizon == "run" else AUTHORS_EMA_EPOCHS

    def agree_to_stop(self, stop_requested: bool) -> bool:
        """Whether any rank was asked to stop; raises NonFiniteLoss when any rank's loss went NaN/inf.

        One device→host read, at log and checkpoint steps only. Under torchrun a signal reaches the
        ranks at different steps, and a rank that stopped alone would leave the others waiting in the
        next all-reduce: one all-reduce of both flags makes every rank decide the same at the same step.
        """
        flags = torch.stack([self._nonfinite, torch.tensor(stop_requested, device=self.device)]).int()
        if self.ddp.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, stop = flags.tolist()
        if nonfinite:
            raise NonFiniteLoss(f"non-finite loss before step {self.step_count}: stopping; the last good "
                                "checkpoint is kept. Lower optim.base_lr or check the data.")
        return bool(stop)

    # -------------------------------------------------------------------------- checkpointing
    def state(self) -> dict[str, Any]:
        """Everything `--resume` needs. Under torchrun every rank must call it (it gathers each rank's
        dropout and mask streams); rank 0 writes it."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step_count, "config": to_dict(self.cfg), "model_config": to_dict(self.model.cfg),
            "loss_config": to_dict(self.cfg.loss),
            "rng": {"mask_ratio": self.ratio_sampler.generator.get_state(), "ranks": self._rank_rng_states()},
        }

    def _rank_rng_states(self) -> list[dict[str, Any]]:
        """Each rank's own random streams (dropout, masks), in rank order."""
        mine = {"torch": torch.get_rng_state(), "mask_perm": self.mask_gen.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        if not self.ddp.distributed:
            return [mine]
        states: list[Any] = [None] * self.ddp.world_size
        dist.all_gather_object(states, mine)
        return states

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = state["step"]
        self.ratio_sampler.generator.set_state(state["rng"]["mask_ratio"])
        ranks = state["rng"].get("ranks", [state["rng"]])  # older checkpoints kept one process's streams
        if len(ranks) != self.ddp.world_size:
            self._reseed_rank_streams(len(ranks))
            return
        mine = ranks[self.ddp.rank]
        torch.set_rng_state(mine["torch"])
        if mine["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda"])
        self.mask_gen.set_state(mine["mask_perm"])

    def _reseed_rank_streams(self, saved_world_size: int) -> None:
        """Resuming on another number of processes: the batches split differently anyway, so the run
        goes on with fresh per-rank streams, seeded from the step so that reruns repeat."""
        if self.ddp.is_main:
            log.warning("checkpoint written by %d processes, resumed by %d: the run continues with the same "
                        "weights, optimizer and data position, not the same masks and dropout draws",
                        saved_world_size, self.ddp.world_size)
        self._seed_rank_streams(self.cfg.seed + self.step_count)

    def _seed_rank_streams(self, seed: int) -> None:
        """The masks' and dropout's random streams, one of each per rank: ranks must not draw alike."""
        self.mask_gen.manual_seed(seed * 7 + self.ddp.rank + 1)
        torch.manual_seed(seed + 1000 * self.ddp.rank)


class MetricsLog:
    """JSONL + TensorBoard, written from host values read once per `log_every` steps.

    A run continues the record of the step it starts from (`start_step`: the resumed checkpoint's, 0 for a
    fresh run). What an earlier process logged after that step (it ran on past its last checkpoint, or
    was killed mid-line) is for steps that run again, so it is removed: the record then equals a straight
    run's.
    """

    def __init__(self, out_dir: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._keep_rows_up_to(start_step)
            # TensorBoard hides the events of earlier files from purge_step on: those of the steps run again.
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)

    def _keep_rows_up_to(self, step: int) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if (logged := _logged_step(line)) is not None and logged <= step]
        if len(kept) < len(lines):
            log.info("metrics.jsonl: dropped %d rows logged after step %d, which runs again", len(lines) - len(kept),
                     step)
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(kept))

    def write(self, step: int, history: list[dict[str, torch.Tensor]], lr: float, seconds: float,
              images: int) -> dict:
        keys = [k for k in METRICS if k in history[0]]
        means = torch.stack([torch.stack([h[k] for h in history]) for k in keys]).mean(dim=1)
        if dist.is_initialized():  # logged values are means over all ranks
            dist.all_reduce(means, op=dist.ReduceOp.AVG)
        means = means.tolist()
        row = {"step": step, **dict(zip(keys, means)), "lr": lr, "images_per_s": images / max(seconds, 1e-9)}
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            for k, v in row.items():
                if k != "step":
                    self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()
        return row


def _logged_step(line: str) -> int | None:
    """The step of a complete metrics.jsonl row; None for a line torn by a killed writer."""
    if not line.endswith("\n"):
        return None
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def make_batches(cfg: TrainConfig, device: torch.device, ddp: Dist):
    shards = resolve_shards(cfg.data.shards)
    per_rank = cfg.batch_size // ddp.world_size
    resident = cfg.data.gpu_resident == "on" or (cfg.data.gpu_resident == "auto" and fits_on_device(shards, device))
    if resident:
        tokens = read_token_set(shards)
        log.info("resident token set: %d samples on %s", len(tokens), device)
        return ResidentBatches(tokens, per_rank, device, cfg.seed, ddp.rank, ddp.world_size), tokens
    log.info("streaming %d shards with %d workers", len(shards), cfg.data.num_workers)
    stream = StreamingBatches(shards, per_rank, device, cfg.seed, cfg.data.shuffle_buffer, cfg.data.num_workers,
                              ddp.rank, ddp.world_size)
    return stream, None


def run_steps(trainer: Trainer, data: Iterator[Batch], metrics: MetricsLog, ckpt_path: Path,
              stop_after: int | None) -> dict:
    """Train until the last step, `stop_after` or a signal, logging and checkpointing on the way;
    returns the last logged metrics."""
    # A signal stops the loop after the step in progress, with a checkpoint; the process's handlers come
    # back when the loop ends (a Ctrl-C during the next pipeline stage is theirs again).
    with stopping.deferred("saving a checkpoint and stopping"):
        return _step_until_done(trainer, data, metrics, ckpt_path, stop_after)


def _step_until_done(trainer: Trainer, data: Iterator[Batch], metrics: MetricsLog, ckpt_path: Path,
                     stop_after: int | None) -> dict:
    cfg, ddp = trainer.cfg, trainer.ddp
    history, last_row, t0 = [], {}, time.perf_counter()
    while trainer.step_count < trainer.total_steps:
        history.append(trainer.step(next(data)))
        step = trainer.step_count
        finished = step >= trainer.total_steps or (stop_after is not None and step >= stop_after)
        log_now, ckpt_now = step % trainer.log_every == 0, step % cfg.ckpt_every == 0
        # One process stops right after a signal; under torchrun the ranks agree at the next log or
        # checkpoint step (see Trainer.agree_to_stop).
        stop = stopping.requested() is not None
        if not (log_now or ckpt_now or finished or (stop and not ddp.distributed)):
            continue
        done = trainer.agree_to_stop(stop) or finished
        if log_now or done:
            seconds = time.perf_counter() - t0
            last_row = metrics.write(step, history, trainer.lr, seconds, len(history) * cfg.batch_size)
            log.info("rank %d/%d step %d/%d loss %.4f rec %.4f contrast %.4f lr %.2e %.0f img/s", ddp.rank,
                     ddp.world_size, step, trainer.total_steps, last_row["loss"], last_row["rec_loss"],
                     last_row["contrast_loss"], last_row["lr"], last_row["images_per_s"])
            history, t0 = [], time.perf_counter()
        if ckpt_now or done:
            state = trainer.state()
            if ddp.is_main:
                save_checkpoint(ckpt_path, state)
        if done:
            break
    return last_row


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, stop_after: int | None = None,
          build: Callable[[TrainConfig, torch.Tensor | None, int], LeaseModel] | None = None,
          export: Callable[[LeaseModel, Path], Path] | None = None) -> dict:
    """Pretrain LEASE per `cfg`, writing checkpoints, metrics and the exported encoder into `out_dir`.

    `resume=True` continues from `out_dir/checkpoint.pt` exactly (weights, optimizer, step, RNG, data
    position). `stop_after` ends the run (with a checkpoint) after that many steps, as an interrupt would.
    `build(cfg, centroids, num_classes)` makes the model (default `build_model`) and `export(model, dir)`
    writes the completed run's export (default the encoder's): the class-conditional decoder
    (`lease.condgen`) trains through this same loop.
    """
    out_dir = Path(out_dir)
    ddp = setup_distributed()
    device = pick_device(ddp)
    out_dir.mkdir(parents=True, exist_ok=True)
    online = None
    if cfg.method == "mage_online":
        (batches, online), tokens = online_inputs(cfg, device, ddp.rank, ddp.world_size), None
    else:
        batches, tokens = make_batches(cfg, device, ddp)
    centroids = load_codebook(cfg.data.codebook) if cfg.model.contrast_on != "none" else None
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every rerun
    num_classes = int(tokens.labels.max()) + 1 if tokens is not None and cfg.model.num_classes == -1 else 0
    model = (build or build_model)(cfg, centroids, num_classes)
    if tokens is not None:
        model.check_tokens(tokens.vq[:4096].long().to(device), tokens.disc[:4096].long().to(device))
    trainer = Trainer(cfg, model, device, ddp, batches.steps_per_epoch, online)
    ckpt_path = out_dir / "checkpoint.pt"
    if resume:
        trainer.load_state(load_checkpoint(ckpt_path))  # on the CPU, where torch takes RNG states
        log.info("resumed from %s at step %d", ckpt_path, trainer.step_count)
    if ddp.is_main:
        log.info("%s | %d steps, %d/epoch, peak lr %.2e, autocast %s", describe(model), trainer.total_steps,
                 batches.steps_per_epoch, trainer.peak_lr, trainer.dtype)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    metrics = MetricsLog(out_dir, enabled=ddp.is_main, start_step=trainer.step_count)
    last_row = run_steps(trainer, batches.iterate(trainer.step_count), metrics, ckpt_path, stop_after)
    if trainer.step_count < trainer.total_steps and ddp.is_main:
        log.info("stopped at step %d of %d, with a checkpoint", trainer.step_count, trainer.total_steps)
    result = {"steps": trainer.step_count, "checkpoint": str(ckpt_path), "final": last_row,
              "completed": trainer.step_count >= trainer.total_steps, "world_size": ddp.world_size}
    if ddp.distributed:
        result.update(backend=dist.get_backend(), ranks_in_sync=ranks_in_sync(model))
    if ddp.is_main and result["completed"]:
        result["encoder" if export is None else "export"] = str((export or export_encoder)(model, out_dir / "export"))
    if ddp.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return result


def ranks_in_sync(model: torch.nn.Module) -> bool:
    """Whether every rank holds bit-identical weights (a checksum gathered from all ranks)."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def load_train_config(path: str | None, overrides: list[str]) -> TrainConfig:
    data = load_yaml(path) if path else {}
    data = data.get("pretrain", data)  # a whole pipeline config: take its pretrain section
    return train_config(apply_overrides(data, overrides))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML with a TrainConfig (or a pipeline config's pretrain section)")
    parser.add_argument("--out", required=True, help="run directory (checkpoint, metrics, export)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. batch_size=256 model.dropout=0.5")


def run_cli(args: argparse.Namespace) -> int:
    result = train(load_train_config(args.config, args.overrides), args.out, resume=args.resume)
    if not result["completed"] and int(os.environ.get("RANK", "0")) == 0:
        log.info("the same command with --resume continues it exactly from %s", result["checkpoint"])
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))  # the command's result, for scripts
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="lease train", description=__doc__)
    add_arguments(parser)
    return run_cli(show_defaults(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
