"""Benchmarks measured on the GPU machine, recorded as JSON under benchmarks/results/.

`lease bench train`: training steps of a preset at a batch size and dtype (eager or compiled) on
device-resident synthetic tokens through the real `Trainer.step`; warm-up, then the median of timed
steps, peak memory, images/s, useful FLOPs per image and MFU against the measured bf16 matmul peak.
`--method lease sorcen mage mage_online` times each method's step at the same settings in one run and
writes one record with their images/s and LEASE's ratio to each (`bench_methods`); mage_online's step
holds its augmentation and VQGAN encode of device-resident synthetic images.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch

from lease.attention import split_cls_self_attention
from lease.configs import MaskConfig, TrainConfig, model_config, train_config
from lease.data import Batch, ResidentBatches
from lease.model import SDPA_KERNELS, flops_per_image
from lease.online import ImageBatch, OnlineTokenizer
from lease.synthetic import uniform_tokens
from benchmarks.kernels import sdpa_fwd_bwd
from benchmarks.records import RESULTS_DIR, results_dir, write_record
from benchmarks.timing import time_calls, time_cuda
from benchmarks.tokenizers import full_width_maskgit_config, random_maskgit_tokenizer
from lease.tokenizers.vqgan_maskgit import MaskGITVQGANConfig
from lease.typed_config import apply_overrides
from lease.train import Dist, Trainer, build_model, compile_for_training

log = logging.getLogger(__name__)
SYNTHETIC_BATCHES = 8  # distinct resident batches a training benchmark cycles through


@contextlib.contextmanager
def no_compilation(what: str) -> Iterator[None]:
    """Fail when `torch.compile` compiles a graph inside the block. A compile inside the timed steps
    leaves their CUDA-event median nearly alone but makes the GPU samples mostly compiler time."""
    before = _compiled_graphs()
    yield
    compiled = _compiled_graphs() - before
    if compiled:
        raise RuntimeError(f"torch.compile compiled {compiled} new graph(s) during {what} (a shape or layout "
                           "not seen in the warm-up): rerun with a larger --warmup")


def _compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


SW_POWER_CAP = 0x4  # nvidia-smi clocks_event_reasons bit: clocks lowered to hold the board's power limit


class GpuSampler:
    """SM clock, board power and active clock-event reasons of one GPU, sampled by nvidia-smi every
    `period_ms` while the block runs; `summary()` is None where nvidia-smi is missing or printed nothing.

    Whether a step is power-capped decides whether saving work in one kernel speeds up the others."""

    QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"

    def __init__(self, gpu_id: str = "0", period_ms: int = 100):
        self.command = ["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits",
                        f"--loop-ms={period_ms}", f"--id={gpu_id}"]
        self.lines: list[str] = []
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "GpuSampler":
        try:
            self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            log.warning("nvidia-smi not found: no clock and power samples")
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate(timeout=30)
            self.lines = out.splitlines()

    def summary(self) -> dict[str, float] | None:
        return summarize_gpu_samples(self.lines)


def nvidia_smi_id(device: torch.device) -> str:
    """The GPU's UUID as nvidia-smi names it (its indices ignore CUDA_VISIBLE_DEVICES)."""
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


def summarize_gpu_samples(lines: list[str]) -> dict[str, float] | None:
    """Medians of 'clock MHz, power W, reasons hex' lines and the fraction of samples under the power cap."""
    samples = []
    for line in lines:
        fields = [field.strip() for field in line.split(",")]
        try:
            samples.append((float(fields[0]), float(fields[1]), int(fields[2], 16)))
        except (ValueError, IndexError):  # "[N/A]" or a partial line at termination
            continue
    if not samples:
        return None
    return {"samples": len(samples), "sm_clock_mhz_median": statistics.median(s[0] for s in samples),
            "power_w_median": round(statistics.median(s[1] for s in samples), 1),
            "power_capped_fraction": round(sum(bool(s[2] & SW_POWER_CAP) for s in samples) / len(samples), 3)}


def matmul_peak_tflops(size: int = 8192, reps: int = 20) -> float:
    """Measured dense bf16 matmul throughput: the MFU denominator."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    ms = statistics.median(time_cuda(lambda: a @ b, warmup=5, steps=reps))
    return 2 * size**3 / (ms / 1e3) / 1e12


KERNEL_CATEGORIES = (  # first match wins: cuDNN's attention kernels also carry "gemm"-like names
    ("attention", ("sdpa", "fmha", "flash", "attention", "cudnn::fusion", "compute_dot_do_o", "_attn_",
                   "_split_cls_")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma")),
    ("optimizer", ("multi_tensor_apply", "adam")),
    ("dropout mask (lease/dropout.py)", ("keep_mask",)),
    ("fused elementwise (Triton)", ("triton_",)),
)


ELEMENTWISE = "fused elementwise (Triton)"
LAYER_NORM, GELU, REDUCTIONS, OTHER = ("LayerNorm passes", "GELU passes", "gradient reductions",
                                       "other elementwise")


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, needles in KERNEL_CATEGORIES:
        if any(needle in lowered for needle in needles):
            return category
    return "other"


def elementwise_part(name: str) -> str:
    """Which passes an inductor kernel of the elementwise class comes from, by the ops in its name:
    LayerNorm (with the residual add and dropout before it), GELU (pointwise, with its dropout), the
    reductions that sum a gradient over rows (biases, LayerNorm weights: passes the floor does not
    count, since each could ride in the pass that writes its input), and the rest (losses, embeddings,
    the attention layout's copies)."""
    if "layer_norm" in name:
        return LAYER_NORM
    if "gelu" in name and name.startswith("triton_poi"):
        return GELU
    if name.startswith(("triton_red", "triton_per")) and "_sum" in name:
        return REDUCTIONS
    return OTHER


def fp8_matmul_peak_tflops(size: int = 8192, reps: int = 20) -> float:
    """Measured dense e4m3 matmul throughput (torch._scaled_mm, bf16 out): the fp8 runs' matmul ceiling."""
    a = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as cuBLAS wants
    one = torch.ones((), device="cuda")
    ms = statistics.median(time_cuda(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16),
                                     warmup=5, steps=reps))
    return 2 * size**3 / (ms / 1e3) / 1e12


def copy_bandwidth_gbps(numel: int = 2**28) -> float:
    """Measured device-to-device copy rate, bytes read + written per second (GB/s): the byte ceiling."""
    src = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = statistics.median(time_cuda(lambda: dst.copy_(src), warmup=5, steps=20))
    return 2 * 2 * numel / (ms / 1e3) / 1e9


GELU_PASS_BYTES = {"forward": 4.125, "backward": 6.125}  # per element of a 4C-wide GELU tensor (below)


def block_row_features(cfg, batch: int, kept: int, decode_rows: int) -> int:
    """Rows × width C summed over the step's blocks: the encoder's kept rows and [CLS], the decoder's
    canvas, and its last block's decoded rows."""
    enc = batch * (kept + 1) * cfg.embed_dim * cfg.depth
    dec_rows = batch * (cfg.seq_len + 1)
    return enc + dec_rows * cfg.decoder_embed_dim * (cfg.decoder_depth - 1) + batch * decode_rows * cfg.decoder_embed_dim


def elementwise_bytes_by_part(cfg, batch: int, kept: int, decode_rows: int, contrast_rows: int,
                              codebook_size: int) -> dict[str, float]:
    """The fewest bytes the step's elementwise passes move with today's fusion (each pass between two
    matmuls reads its inputs once and writes its outputs once; LayerNorm fused with the residual add
    before it, GELU and dropout with each other), counted per row and feature of a block of width C:

    LayerNorm  forward (2r + 4⅛) twice, backward (3r + 4⅛) twice:        10r + 16½
    GELU       on 4C: forward 4 × 4⅛, backward 4 × 6⅛ (GELU_PASS_BYTES):       41

    with r the residual stream's bytes (4 in fp32, 2 with residual_dtype=autocast), 2 for 16-bit
    activations and ⅛ per bit-packed dropout mask; and under "other elementwise" the contrast and MLM
    logits, read twice with their gradient written once (6 bytes per logit). Optimizer and embedding
    passes are left out, and the gradient reductions count nothing."""
    r = 2 if cfg.residual_dtype == "autocast" else 4
    features = block_row_features(cfg, batch, kept, decode_rows)
    logits = batch * (contrast_rows * codebook_size + decode_rows * cfg.vocab_gen)
    return {LAYER_NORM: (10 * r + 16.5) * features, GELU: 4 * sum(GELU_PASS_BYTES.values()) * features,
            OTHER: 6.0 * logits}


def elementwise_bytes_per_step(cfg, batch: int, kept: int, decode_rows: int, contrast_rows: int,
                               codebook_size: int) -> float:
    """All of `elementwise_bytes_by_part`: 10r + 57.5 bytes per block row and feature, plus the logits."""
    return sum(elementwise_bytes_by_part(cfg, batch, kept, decode_rows, contrast_rows, codebook_size).values())


def attention_bytes_per_step(cfg, batch: int, kept: int) -> float:
    """q, k, v, O, dO, dq, dk and dv once each per layer, in 16 bits."""
    return 16 * batch * ((kept + 1) * cfg.embed_dim * cfg.depth + (cfg.seq_len + 1) * cfg.decoder_embed_dim
                         * cfg.decoder_depth)


def kernel_floors_ms(cfg, batch: int, kept: int, decode_rows: int, contrast_rows: int, codebook_size: int,
                     executed: dict[str, float], peak_tflops: float, copy_gbps: float,
                     issue_per_s: float | None = None,
                     gelu_instructions: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Each kernel class's floor per step: FLOPs over the measured matmul rate and bytes over the measured
    copy rate, the larger of the two ("floor_ms"). FLOPs are what torch's counter saw in an eager step
    (`executed_tflop`); bytes are the counts above.

    Given the GPU's instruction issue rate and the instructions per element of the exact-erf GELU passes
    (`benchmarks.sass`), each of those two passes counts the larger of its bytes and its instructions:
    they are bound by issue, not by memory."""
    def floor(tflop: float, gbytes: float) -> dict[str, float]:
        flop_ms, byte_ms = tflop / peak_tflops * 1e3, gbytes / copy_gbps * 1e3
        return {"tflop": round(tflop, 3), "gbytes": round(gbytes, 2), "flop_floor_ms": round(flop_ms, 2),
                "byte_floor_ms": round(byte_ms, 2), "floor_ms": round(max(flop_ms, byte_ms), 2),
                "measured_peak_tflops": round(peak_tflops, 1), "measured_copy_gbps": round(copy_gbps, 1)}

    by_part = elementwise_bytes_by_part(cfg, batch, kept, decode_rows, contrast_rows, codebook_size)
    floors = {"matmul": floor(executed.get("matmul", 0.0), 0.0),
              "attention": floor(executed.get("attention", 0.0), attention_bytes_per_step(cfg, batch, kept) / 1e9),
              ELEMENTWISE: floor(0.0, sum(by_part.values()) / 1e9)}
    parts = {part: round(b / (copy_gbps * 1e9) * 1e3, 2) for part, b in by_part.items()}
    parts[REDUCTIONS] = 0.0
    if issue_per_s and gelu_instructions:
        gelu = gelu_issue_floors(4 * block_row_features(cfg, batch, kept, decode_rows), gelu_instructions,
                                 issue_per_s, copy_gbps)
        parts[GELU] = gelu["floor_ms"]
        floors[ELEMENTWISE].update(gelu_passes=gelu["passes"], measured_issue_tera_per_s=round(issue_per_s / 1e12, 2))
    floors[ELEMENTWISE].update(parts_floor_ms=parts, floor_ms=round(sum(parts.values()), 2))
    return floors


def gelu_issue_floors(elements: float, instructions: dict[str, float], issue_per_s: float,
                      copy_gbps: float) -> dict[str, Any]:
    """The GELU passes' floor with each pass at the larger of its byte and its issue time."""
    passes = {}
    for name, bytes_per_element in GELU_PASS_BYTES.items():
        byte_ms = elements * bytes_per_element / (copy_gbps * 1e9) * 1e3
        issue_ms = elements * instructions[name] / issue_per_s * 1e3
        passes[name] = {"instructions_per_element": instructions[name], "byte_floor_ms": round(byte_ms, 2),
                        "issue_floor_ms": round(issue_ms, 2)}
    return {"passes": passes,
            "floor_ms": round(sum(max(p["byte_floor_ms"], p["issue_floor_ms"]) for p in passes.values()), 2)}


def parts_distance(measured_ms: dict[str, float], floor_ms: dict[str, float]) -> dict[str, float | None]:
    """measured / floor for each elementwise part; None where the floor counts nothing (the reductions)."""
    return {part: round(ms / floor_ms[part], 2) if floor_ms.get(part) else None for part, ms in measured_ms.items()}


def _issue_ceiling(device: torch.device, gpu: dict[str, Any] | None) -> tuple[float | None, dict[str, float] | None]:
    """The issue rate at the timed steps' median SM clock, and the GELU passes' instructions per element
    compiled for this GPU (`benchmarks.sass`); none without clock samples."""
    from benchmarks import sass

    if not gpu:
        log.warning("no SM clock samples during the timed steps (too few?): the GELU passes' instruction floor "
                    "is left out of the record")
        return None, None
    props = torch.cuda.get_device_properties(device)
    try:
        instructions = sass.instructions_per_element(props.major * 10 + props.minor)
    except (OSError, subprocess.CalledProcessError) as err:  # no cuobjdump beside this Triton
        log.warning("the GELU passes' instruction floor is left out of the record: %s", err)
        return None, None
    return sass.issue_rate(props.multi_processor_count, gpu["sm_clock_mhz_median"]), instructions


def _profiled(fn: Callable[[], Any], steps: int):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def _device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def category_ms(events, steps: int, classify: Callable[[str], str] = kernel_category) -> dict[str, float]:
    """GPU milliseconds per call by kernel category (matmul, attention, Triton elementwise, ...), or by
    another classification of kernel names."""
    totals: dict[str, float] = {}
    for event in events:
        category = classify(event.key)
        totals[category] = totals.get(category, 0.0) + _device_us(event) / 1e3 / steps
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v > 0}


class Profile(NamedTuple):
    text: str  # the per-category summary and the top kernels' table
    categories_ms: dict[str, float]  # per call, by kernel_category
    elementwise_ms: dict[str, float]  # the elementwise class per call, by elementwise_part


def profile_table(fn: Callable[[], Any], steps: int = 5, rows: int = 100) -> Profile:
    """Top CUDA kernels by self time over a few calls, and the per-call time of each kernel category."""
    events = _profiled(fn, steps)
    categories = category_ms(events, steps)
    elementwise = category_ms([e for e in events if kernel_category(e.key) == ELEMENTWISE], steps, elementwise_part)
    summary = "\n".join(f"{name:>30}: {ms:8.2f} ms per call" for name, ms in categories.items())
    parts = "\n".join(f"{'  ' + name:>30}: {ms:8.2f} ms per call" for name, ms in elementwise.items())
    table = events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=90)
    return Profile(f"{summary}\n\n{ELEMENTWISE}, by passes:\n{parts}\n\n{table}", categories, elementwise)


def executed_tflop(trainer: Trainer, batch: Batch, count_images: int = 16) -> dict[str, float]:
    """TFLOP that one eager forward + backward of `batch` executes, by torch's FLOP counter: matmuls
    (mm, addmm, bmm) and the fused attention kernels, at the mean mask ratio. Unlike
    `flops_per_image`, what `decode_masked_only` skips is not in it: divided by the profile's kernel
    times it gives the rate at which the matmuls and attention kernels actually ran.

    Counted on the first `count_images` images and scaled to the batch (the count is linear in it),
    so the eager step fits beside the compiled one whatever the preset."""
    from torch.utils.flop_counter import FlopCounterMode

    model, n = trainer.model, min(count_images, batch.vq.shape[0])
    plan = trainer.plan_at_mean_ratio(n)
    with FlopCounterMode(display=False) as counter, trainer.autocast():
        model(batch.vq[:n], None if batch.disc is None else batch.disc[:n], plan).backward_loss().backward()
    model.zero_grad(set_to_none=True)
    totals = {"matmul": 0.0, "attention": 0.0}
    scale = batch.vq.shape[0] / n / 1e12
    for op, flops in counter.get_flop_counts()["Global"].items():
        attention = "scaled_dot_product" in str(op) or "attention_" in str(op)  # SDPA, lease.kernels_attention
        totals["attention" if attention else "matmul"] += flops * scale
    return totals


def kernel_tflops(executed: dict[str, float], kernel_ms: dict[str, float]) -> dict[str, float]:
    """TFLOP/s of each kernel category that did FLOPs: executed TFLOP per step / profiled ms per step."""
    return {name: round(tflop / (kernel_ms[name] / 1e3), 1) for name, tflop in executed.items()
            if tflop > 0 and kernel_ms.get(name)}


def synthetic_trainer(cfg: TrainConfig, codebook_size: int, codebook_dim: int, device: torch.device,
                      vqgan: MaskGITVQGANConfig | None = None) -> tuple[Trainer, Iterator[Batch | ImageBatch]]:
    """A Trainer for `cfg` with a random codebook, and its batches of uniform synthetic tokens resident on
    `device` (SYNTHETIC_BATCHES distinct batches): real shapes and real arithmetic, nothing to learn.

    For mage_online the batches are uniform uint8 images at the VQGAN's input side, and the Trainer
    tokenizes them in its step with a random-weight MaskGIT VQGAN of the sizes `vqgan` (default MAGE's)
    and MAGE's augmentation (`cfg.online`), compiled when `cfg.compile`."""
    centroids = torch.randn(codebook_size, codebook_dim) if cfg.model.contrast_on != "none" else None
    model = build_model(cfg, centroids)
    if cfg.method != "mage_online":
        tokens = uniform_tokens(cfg.batch_size * SYNTHETIC_BATCHES, model.cfg.seq_len, model.cfg.vocab_gen,
                                codebook_size, seed=0)
        batches = ResidentBatches(tokens, cfg.batch_size, device, seed=0)
        return Trainer(cfg, model, device, Dist(), batches.steps_per_epoch), batches.iterate(0)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    vqgan = random_maskgit_tokenizer(vqgan or full_width_maskgit_config(), device, dtype, cfg.compile)
    online = OnlineTokenizer(vqgan, cfg.online.crop_scale, cfg.online.crop_ratio, cfg.online.flip)
    side = vqgan.image_size
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (SYNTHETIC_BATCHES, cfg.batch_size, 3, side, side), dtype=torch.uint8,
                           device=device, generator=gen)
    labels = torch.zeros(cfg.batch_size, dtype=torch.int64, device=device)
    return (Trainer(cfg, model, device, Dist(), SYNTHETIC_BATCHES, online),
            (ImageBatch(batch, labels) for batch in itertools.cycle(images)))


def bench_train(preset: str, batch_size: int, dtype: str, compile: bool, steps: int, warmup: int,
                codebook_size: int, codebook_dim: int, model_overrides: dict[str, Any] | None = None,
                profile_to: Path | None = None, compile_mode: str = "default", method: str = "lease",
                device: str = "cuda", vqgan: MaskGITVQGANConfig | None = None) -> dict[str, Any]:
    """Time `Trainer.step` for a preset and method; `model_overrides` are ModelConfig fields (dropout,
    kernels, ...), on top of the method's layout. Sorcen is timed in its steady state (the echo drawn
    from the decoder's logits, not the first epochs' true tokens). `device="cpu"` times by the wall clock
    and records no memory, GPU samples or MFU (tests)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("lease bench train measures GPU training speed: no CUDA device found")
    on_cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = train_config({"preset": preset, "method": method, "model": dict(model_overrides or {}),
                        "batch_size": batch_size, "dtype": dtype, "compile": compile, "compile_mode": compile_mode,
                        "max_steps": 10**9, "ema": {"echo_from_truth_epochs": 0.0}})
    contrast_on = cfg.model.contrast_on
    trainer, data = synthetic_trainer(cfg, codebook_size, codebook_dim, device, vqgan)
    model = trainer.model
    last_metrics: dict[str, torch.Tensor] = {}

    def train_step() -> None:
        last_metrics.update(trainer.step(next(data)))

    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    first_step_s = round(_first_step_seconds(train_step, on_cuda), 3)  # as recorded: the log shows the same value
    log.info("%s %s b%d: first step %.1f s%s; %d more warm-up steps, then %d timed", method, preset, batch_size,
             first_step_s, " (compiling)" if compile else "", max(warmup - 1, 0), steps)
    time_calls(train_step, max(warmup - 1, 0), 0, device)  # recompiles for the other plan shapes, if any
    sampler = GpuSampler(nvidia_smi_id(device)) if on_cuda else contextlib.nullcontext()
    with no_compilation("the timed steps"), sampler:
        ms = time_calls(train_step, 0, steps, device)
    gpu = sampler.summary() if on_cuda else None
    final_metrics = finite_metrics(last_metrics)
    median_ms = statistics.median(ms)
    # before the eager step that counts FLOPs
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None
    peak = matmul_peak_tflops() if on_cuda else None  # the MFU's denominator and the bf16 matmul ceiling
    profiled: dict[str, Any] = {}
    if profile_to is not None:
        profile_to.parent.mkdir(parents=True, exist_ok=True)
        profile = profile_table(lambda: trainer.step(next(data)))
        profile_to.write_text(profile.text)
        kernel_ms = profile.categories_ms
        tokens = next(data)
        executed = executed_tflop(trainer, trainer.online.tokenize(tokens) if trainer.online else tokens)
        plan = trainer.plan_at_mean_ratio(batch_size)
        floors = kernel_floors_ms(model.cfg, batch_size, model.cfg.seq_len - trainer.num_dropped,
                                  plan.decode_idx.shape[1], plan.contrast_idx.shape[1], codebook_size, executed,
                                  fp8_matmul_peak_tflops() if model.cfg.matmul_dtype == "fp8" else peak,
                                  copy_bandwidth_gbps(), *_issue_ceiling(device, gpu))
        profiled = {"profile_ms_per_step": kernel_ms,
                    "executed_tflop_per_step": {k: round(v, 3) for k, v in executed.items()},
                    "profile_kernel_tflops": kernel_tflops(executed, kernel_ms), "kernel_floors": floors,
                    "distance_to_floor": {k: round(kernel_ms[k] / v["floor_ms"], 2) for k, v in floors.items()
                                          if kernel_ms.get(k) and v["floor_ms"]},
                    "profile_elementwise_ms_per_step": profile.elementwise_ms,
                    "elementwise_distance_to_floor": parts_distance(profile.elementwise_ms,
                                                                    floors[ELEMENTWISE]["parts_floor_ms"])}
    kept = model.cfg.seq_len - trainer.num_dropped
    flops = flops_per_image(model.cfg, kept, codebook_size)
    images_per_s = batch_size / (median_ms / 1e3)
    achieved = flops * images_per_s / 1e12
    return {"method": method, "preset": preset, "batch_size": batch_size, "dtype": dtype, "compile": compile,
            "compile_mode": compile_mode if compile else None, "attention": model.attention_backend,
            "sdpa_kernel": model.cfg.sdpa_kernel, "dropout": model.cfg.dropout, "attn_dropout": model.cfg.attn_dropout,
            "dropout_impl": model.cfg.dropout_impl if compile else "torch",  # eager: always torch's kernel
            "decode_masked_only": model.decodes_masked_only, "residual_dtype": model.cfg.residual_dtype,
            "matmul_dtype": model.cfg.matmul_dtype,
            "contrast_on": contrast_on, "codebook_size": codebook_size,
            "steps_timed": steps, "warmup_steps": warmup, "first_step_s": first_step_s,
            "median_ms_per_step": round(median_ms, 3),
            "p10_ms": round(sorted(ms)[len(ms) // 10], 3), "p90_ms": round(sorted(ms)[9 * len(ms) // 10], 3),
            "images_per_s": round(images_per_s, 1),
            "peak_memory_gib": None if peak_gib is None else round(peak_gib, 2),
            # the transformer's FLOPs: mage_online's VQGAN encode is in the time, not in this count
            "useful_tflop_per_image": round(flops / 1e12, 6), "achieved_tflops": round(achieved, 1),
            "measured_bf16_matmul_peak_tflops": None if peak is None else round(peak, 1),
            "mfu": None if peak is None else round(achieved / peak, 4),
            "gpu_during_timed_steps": gpu, "last_step_metrics": final_metrics,
            **profiled}


def _first_step_seconds(step: Callable[[], None], on_cuda: bool) -> float:
    """Wall-clock seconds of the first call (compilation included), logged before any timing starts so a
    long compile shows in the log as one."""
    log.info("first training step (with --compile on this compiles the step; minutes on a fresh machine)")
    start = time.perf_counter()
    step()
    if on_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


METHOD_RATIOS = ("sorcen", "mage", "mage_online")  # LEASE's images/s over each of these (the paper's speed figure)


def bench_methods(methods: list[str], **settings: Any) -> dict[str, Any]:
    """`bench_train` for each method at the same `settings`, one after the other in this process, and
    LEASE's images/s over each other method's (`"lease/sorcen"`, ...; where both were timed)."""
    runs = {}
    for method in methods:
        torch._dynamo.reset()  # each method's graphs compiled afresh, none evicting another's
        runs[method] = bench_train(method=method, **settings)
        log.info("%s: %.0f img/s, %.1f ms/step", method, runs[method]["images_per_s"],
                 runs[method]["median_ms_per_step"])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rates = {method: run["images_per_s"] for method, run in runs.items()}
    ratios = {f"lease/{other}": round(rates["lease"] / rates[other], 4) for other in METHOD_RATIOS
              if "lease" in rates and other in rates}
    return {"methods": list(methods), "images_per_s": rates,
            "peak_memory_gib": {method: run["peak_memory_gib"] for method, run in runs.items()},
            "ratios": ratios, "runs": runs}


def finite_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """The last timed step's loss and gradient norm, read back once; non-finite ones void the timing:
    NaN arithmetic runs at other speeds and power than real training."""
    values = {name: round(float(value), 4) for name, value in metrics.items()}
    if not all(math.isfinite(v) for v in values.values()):
        raise RuntimeError(f"training went non-finite during the timed steps ({values}): the timing would "
                           "measure NaN arithmetic, so no record is written")
    return values


def bench_attention(preset: str, batch_size: int, steps: int) -> list[dict[str, Any]]:
    """Forward + backward of attention at the preset's encoder and decoder shapes, per kernel.

    The encoder attends over [CLS] + kept tokens, the decoder over [CLS] + the full canvas; with the
    preset's attention dropout and without (what dropout costs inside the kernel). The SDPA kernels
    and `lease.attention`'s split of the [CLS] row and column (compiled, as in the model) each get
    q, k, v as views of one packed projection. cuDNN also runs without the [CLS] token: the bound the
    split aims at. Kernels that refuse a shape are reported as unsupported.
    """
    cfg = model_config(preset)
    kept = cfg.seq_len - math.ceil(cfg.seq_len * MaskConfig().ratio_min)
    shapes = {"encoder": (cfg.num_heads, kept + 1, cfg.embed_dim // cfg.num_heads),
              "decoder": (cfg.decoder_num_heads, cfg.seq_len + 1, cfg.decoder_embed_dim // cfg.decoder_num_heads)}
    compiled_split = compile_for_training(split_cls_self_attention, "default", dynamic=False)  # as in training
    rows = []
    for (part, (heads, tokens, head_dim)), dropout in itertools.product(shapes.items(), (cfg.attn_dropout, 0.0)):
        runs = [(name, tokens, sdpa_fwd_bwd(SDPA_KERNELS[name], batch_size, heads, tokens, head_dim, dropout))
                for name in ("cudnn", "flash", "efficient")]
        runs += [("split_cls", tokens, _split_run(compiled_split, batch_size, tokens, heads, head_dim, dropout)),
                 ("cudnn", tokens - 1, sdpa_fwd_bwd(SDPA_KERNELS["cudnn"], batch_size, heads, tokens - 1, head_dim,
                                                    dropout))]
        for name, n, fwd_bwd in runs:
            try:
                ms = statistics.median(time_cuda(fwd_bwd, warmup=5, steps=steps))
            except RuntimeError as err:
                rows.append({"part": part, "kernel": name, "supported": False, "error": str(err).splitlines()[0]})
                continue
            rows.append({"part": part, "kernel": name, "supported": True, "batch": batch_size, "heads": heads,
                         "tokens": n, "head_dim": head_dim, "dropout": dropout, "fwd_bwd_ms": round(ms, 3)})
            log.info("%s attention [%d, %d, %d, %d] %s, dropout %g: %.3f ms fwd+bwd", part, batch_size, heads,
                     n, head_dim, name, dropout, ms)
    return rows


def _split_run(attend: Callable, batch: int, tokens: int, heads: int, head_dim: int,
               dropout: float) -> Callable[[], None]:
    """Forward + backward of `lease.attention`'s split_cls on the packed projection leaf [B, N, 3·C]."""
    packed = torch.randn(batch, tokens, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn(batch, tokens, heads * head_dim, device="cuda", dtype=torch.bfloat16)
    return lambda: torch.autograd.grad(attend(packed, heads, dropout), packed, grad)


def _gpu_details(r: dict[str, Any]) -> str:
    """The matmuls' rate (records that profiled and counted executed FLOPs) and the clock and power
    during the timed steps (records that sampled them)."""
    text = ""
    rate = r.get("profile_kernel_tflops", {}).get("matmul")
    if rate is not None:
        share = rate / r["measured_bf16_matmul_peak_tflops"]
        text += f", matmuls at {rate:.0f} TFLOP/s ({100 * share:.0f} % of peak)"
    gpu = r.get("gpu_during_timed_steps")
    if gpu:
        text += (f", SM {gpu['sm_clock_mhz_median']:.0f} MHz at {gpu['power_w_median']:.0f} W, "
                 f"power-capped {100 * gpu['power_capped_fraction']:.0f} % of the time")
    return text


def _result_rows(name: str, results: Any) -> list[tuple[str, str, str]]:
    """(what, measured, settings) rows of one record for the README table; [] for records not tabled."""
    r = results
    if name.startswith("train-") and isinstance(r, dict):
        mode = "compiled" if r["compile"] else "eager"
        extra = "".join(f", {k} {r[k]}" for k in ("sdpa_kernel",) if r.get(k, "default") != "default")
        extra += f", attention_backend {r['attention']}" if "-attention_backend_" in name else ""
        extra += f", dropout {r['dropout']:g}" if r.get("dropout", 0.1) != 0.1 else ""
        extra += f", {r.get('dropout_impl', 'torch')} dropout mask" if r.get("dropout", 0.1) else ""
        extra += ", decoder at every position" if r.get("decode_masked_only") is False else ""
        extra += ", bf16 residual stream" if r.get("residual_dtype") == "autocast" else ""
        extra += ", fp8 matmuls (torchao)" if r.get("matmul_dtype") == "fp8" else ""
        extra += f", {r['compile_mode']}" if r.get("compile_mode") not in (None, "default") else ""
        return [(f"train {r['preset']} b{r['batch_size']} {r['dtype']} {mode}{extra}",
                 f"{r['images_per_s']:.0f} img/s", f"{r['median_ms_per_step']:.1f} ms/step, MFU {100 * r['mfu']:.1f} %, "
                 f"{r['peak_memory_gib']:.1f} GiB" + _gpu_details(r))]
    if name.startswith("methods-") and isinstance(r, dict):
        first = r["runs"][r["methods"][0]]
        mode = "compiled" if first["compile"] else "eager"
        settings = f"{first['preset']} b{first['batch_size']} {first['dtype']} {mode}"
        rows = [(f"train {method} {settings}", f"{r['images_per_s'][method]:.0f} img/s",
                 f"{run['median_ms_per_step']:.1f} ms/step" + (f", {run['peak_memory_gib']:.1f} GiB"
                                                                if run["peak_memory_gib"] is not None else ""))
                for method, run in r["runs"].items()]
        if r["ratios"]:
            rows.append((f"LEASE's speed-up, {settings}", ", ".join(f"{k} {v:.3f}×" for k, v in r["ratios"].items()),
                         "images/s ratios in one run (`lease bench train --method ...`)"))
        return rows
    if name.startswith("tokenize-vqgan-encode"):
        return [(f"VQGAN encode (MaskGIT, ch 128) b{r['batch_size']} {r['dtype']} "
                 f"{'compiled' if r['compile'] else 'eager'}", f"{r['images_per_s']:.0f} img/s",
                 f"{r['median_ms_per_step']:.1f} ms/batch")]
    if name.startswith("tokenize-dinov2"):
        return [(f"DINOv2-B/14 features b{r['batch_size']} {r['dtype']}", f"{r['images_per_s']:.0f} img/s",
                 f"block {r['block']}")]
    if name.startswith("tokenize-end-to-end"):
        return [(f"tokenize JPEG → shards ({'nvJPEG' if r['gpu_decode'] else 'CPU'} decode, compile "
                 f"{r.get('compile', 'off')})", f"{r['images_per_s']:.0f} img/s",
                 f"{r['num_images']} JPEGs of {r['sides'][0]}-{r['sides'][1]} px, {r['workers']} workers")]
    if name.startswith("precompute") and r.get("tokenizers", "full") == "full":
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["imagenet_1k_stage_seconds"].items())
        where = {None: "", 0: ", in this process"}.get(r.get("workers"), f", {r.get('workers')} Dask worker(s)")
        return [(f"precompute {r['preset']}: {r['num_images']['train'] + r['num_images']['val']} JPEGs, "
                 f"all tokenize stages{where}", f"{r['total_seconds']:.0f} s",
                 f"ImageNet-1K estimate {r['imagenet_1k_minutes']:.1f} min ({stages})")] + [
            (f"precompute {r['preset']}: fused tokenize pass, "
             + (f"{run['workers']} Dask worker(s) ({run['cluster']})" if run["workers"] else "in this process"),
             f"{run['tokenize_images_per_s_after_compile']:.0f} img/s", "after compilation (`lease bench precompute "
             "--workers ...`)") for run in r.get("runs", []) if run.get("tokenize_images_per_s_after_compile")]
    if name.startswith("condgen-"):
        mode = "compiled" if r["compile"] else "eager"
        return [(f"condgen decoder step, tail={tail}: {r['preset']} b{r['batch_size']} {r['dtype']} {mode}",
                 f"{r[key]['train_images_per_s']:.0f} img/s",
                 f"{r[key]['train_ratio_to_pretrain']:.2f}× pretraining ({r['pretrain_images_per_s']:.0f}); sampling "
                 f"{r[key]['generation_images_per_s']:.0f} img/s, {r[key]['generation_ratio_to_unconditional']:.2f}× "
                 f"unconditional (`lease bench condgen`)") for tail, key in (("none", "condgen_none"),
                                                                          ("centroids", "condgen_centroids"))]
    if name.startswith("eval-"):
        rows = [(f"{label} ({r[part]['batch']}-image batches, {r['workers']} decode workers)",
                 f"{r[part]['images_per_s']:.0f} img/s", f"target {r[part]['target_images_per_s']}; a long epoch's "
                 f"rate from two epochs' difference, each epoch also pays "
                 f"{r[part]['epoch_fill_seconds']:.1f} s to start"
                 + _gpu_step_bound(r[part]) + " (`lease bench eval`)")
                for part, label in (("probe", "online linear probe, authors protocol"),
                                    ("finetune", "fine-tuning with RandAug + Mixup/CutMix")) if part in r]
        rows += [(f"eval loader alone, {view} view", f"{x['images_per_s']:.0f} img/s", "decode + augmentation, "
                  "no GPU work") for view, x in r.get("loaders", {}).items()]
        if "knn" in r:
            rows.append((f"robustness k-NN: {r['knn']['queries']} queries vs {r['knn']['bank']} bank",
                         f"{r['knn']['total_seconds']:.1f} s", "features + k-NN + tokenization at the recorded rate"))
        return rows
    if name.startswith("authors-mage"):
        theirs, ours = r["authors"], r["ours"]
        return [(f"the authors' MAGE step (LTH14/mage, {theirs['dtype']}, eager) b{theirs['batch_size']}",
                 f"{theirs['images_per_s']:.0f} img/s", f"{theirs['median_ms_per_step']:.1f} ms/step, "
                 f"{theirs['peak_memory_gib']:.1f} GiB; ours (mage_online, {ours['dtype']} "
                 f"{'compiled' if ours['compile'] else 'eager'}) {ours['images_per_s']:.0f} img/s in the same job: "
                 f"{r['ours_over_authors']:.2f}× (`lease bench authors`)")]
    if name.startswith("kmeans"):
        return [(f"k-means K={r['k']} D={r['d']} N={r['n'] / 1e6:g}M, {r['iters']} iters",
                 f"{r['seconds']:.1f} s", r["backend"])]
    if name.startswith("assign"):
        return [(f"nearest centroid N={r['n'] / 1e6:g}M vs K={r['k']}×{r['d']}", f"{r['seconds_median']:.3f} s",
                 f"{r['matmul_dtype']}, agreement with fp64 {r['agreement_with_fp64']:.5f}")]
    if name.startswith("knn"):
        return [(f"k-NN {r['num_train']}×768 bank, {r['num_query']} queries", f"{r['seconds']:.1f} s",
                 r["matmul_dtype"])]
    if name.startswith("generate"):
        return [(f"generate {r['steps']}-step MaskGIT + VQGAN decode b{r['batch_size']} {r['dtype']}",
                 f"{r['images_per_s']:.0f} img/s", f"50K samples in {r['seconds_for_50k']:.0f} s")]
    if name.startswith("numerics-"):
        switch = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
        return [(f"loss with {switch}: {r['preset']} b{r['batch_size']} {r['dtype']}, {r['steps']} steps on "
                 "planted tokens", f"held-out loss Δ {r['heldout_gap_switched']:.4f}",
                 f"next seed Δ {r['heldout_gap_next_seed']:.4f}; training-curve gaps {r['gap_switched_vs_baseline']:.4f} "
                 f"vs {r['gap_next_seed_vs_baseline']:.4f} (`lease bench numerics`)")]
    if name.startswith("ddp-"):
        return [(f"torchrun nproc {r['nproc']} vs one process: {r['preset']} b{r['batch_size']} {r['dtype']}, "
                 f"{r['steps']} steps on planted tokens", f"loss Δ {r['gap_torchrun_vs_one_process']:.4f}",
                 f"next seed Δ {r['gap_next_seed_vs_one_process']:.4f}; every rank logged every step, weights "
                 f"identical across ranks ({r['backend']}, `lease bench ddp`)")]
    if name.startswith("kernels-") and isinstance(r, dict):
        rows = []
        for part, x in r.get("attention", {}).items():
            shape = f"[{x['batch']}, {x['heads']}, {x['tokens']}, {x['head_dim']}]"
            cudnn = x["sdpa_fwd_bwd_ms"].get("cudnn")
            rows.append((f"attention fwd+bwd {part} {shape} lease.kernels_attention (Triton)",
                         f"{x['triton_fwd_bwd_ms']:.2f} ms", f"dropout {x['dropout']:g}; cuDNN {cudnn} ms; floors "
                         f"{x['flop_floor_ms']} ms (FLOPs) / {x['byte_floor_ms']} ms (bytes) (`lease bench kernels`)"))
        return rows
    if name.startswith("attention") and isinstance(r, list):
        return [(f"attention fwd+bwd {x['part']} [{x['batch']}, {x['heads']}, {x['tokens']}, {x['head_dim']}] "
                 f"{x['kernel']}", f"{x['fwd_bwd_ms']:.2f} ms", f"dropout {x['dropout']:g}")
                for x in r if x.get("supported")]
    return []


# The records the README's table shows, one per kind of work (the full table is in benchmarks/README.md).
README_RECORDS = (
    "methods-lease-sorcen-mage-mage_online-vit_base-b256-bf16-compile", "train-vit_base-b256-bf16-compile",
    "ddp-vit_base-b256-bf16-x1", "numerics-vit_base-b256-bf16-residual_dtype_autocast",
    "authors-mage-vit_base-b256-ours_compile", "precompute-in1k_vitb-150000-h200",
    "precompute-in1k_vitb-150000-workers1", "tokenize-end-to-end-cpudecode-compile_auto", "tokenize-dinov2-b256-bf16",
    "tokenize-vqgan-encode-b128-bf16-compile", "kmeans-4M-768-k16384", "assign", "knn-1281167x768-q50000",
    "generate-vit_base-b256-bf16-compile", "kernels-vit_base-b256", "condgen-vit_base-b256-bf16-compile",
    "eval-vit_base")


def _gpu_step_bound(part: dict) -> str:
    """", GPU step X ms (Y img/s)": the step on a resident batch, which bounds a long epoch's rate."""
    step = part.get("gpu_ms_per_step", {}).get("step")
    return f"; GPU step {step:.0f} ms ({part['batch'] * 1000 / step:.0f} img/s)" if step else ""


def results_table(directory: str | Path = RESULTS_DIR, only: tuple[str, ...] | None = None) -> str:
    """Markdown table of the records under `directory` (`only`: those of these names; README_RECORDS is
    the README's, every record the one in benchmarks/README.md)."""
    lines = ["| benchmark | measured | details | machine |", "|---|---|---|---|"]
    paths = sorted(Path(directory).glob("*.json"))
    if only is not None:
        missing = set(only) - {p.stem for p in paths}
        if missing:
            raise FileNotFoundError(f"no benchmark records {sorted(missing)} under {directory}")
        paths = [p for p in paths if p.stem in only]
    for path in paths:
        record = json.loads(path.read_text())
        machine = record.get("machine", {})
        where = f"{machine.get('gpu', '?')}, torch {machine.get('torch', '?')}"
        results = record.get("results", record)
        for what, value, details in _result_rows(record.get("name", path.stem), results):
            lines.append(f"| {what} | {value} | {details} | {where} |")
    return "\n".join(lines) + "\n"


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=str(RESULTS_DIR))
    parser.add_argument("--all", action="store_true", help="every record (benchmarks/README.md's table), not "
                        "the README's headline records")


def run_table_cli(args: argparse.Namespace) -> int:
    sys.stdout.write(results_table(args.dir, None if args.all else README_RECORDS))
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="vit_base")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--codebook-dim", type=int, default=768)
    parser.add_argument("--out-dir", default=None, help="where the JSON records go (default benchmarks/results)")
    parser.add_argument("--profile", action="store_true", help="also write a kernel-time table beside each record")
    parser.add_argument("--sdpa-kernel", nargs="+", default=["default"], choices=["default", *SDPA_KERNELS],
                        help="SDPA kernel(s) to run the step with (one record each)")
    parser.add_argument("--dropout-impl", nargs="+", default=["triton"], choices=["triton", "torch"],
                        help="dropout mask RNG(s) outside attention (one record each; see lease/dropout.py)")
    parser.add_argument("--model", nargs="+", default=[], metavar="KEY=VALUE",
                        help="ModelConfig overrides, e.g. decode_masked_only=off (named in the record's file name)")
    parser.add_argument("--dropout", type=float, default=None,
                        help="override dropout and attention dropout (default: the preset's 0.1); 0 shows their cost")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"])
    parser.add_argument("--method", nargs="+", default=["lease"], choices=["lease", *METHOD_RATIOS],
                        help="methods to time at the same settings; more than LEASE alone writes one "
                             "methods-* record with each one's images/s and LEASE's ratio to the others")
    parser.add_argument("--attention-only", action="store_true",
                        help="time attention fwd+bwd per kernel (SDPA's and lease/attention.py's split_cls) "
                             "at the preset's shapes instead of whole steps")


def train_record_name(preset: str, batch: int, dtype: str, compile_mode: str | None,
                      overrides: dict[str, Any]) -> str:
    """`train-<preset>-b<batch>-<dtype>-<compile|eager>[-mode]` plus a suffix per non-default setting."""
    name = f"train-{preset}-b{batch}-{dtype}-{'eager' if compile_mode is None else 'compile'}"
    if compile_mode not in (None, "default"):
        name += f"-{compile_mode}"
    if overrides.get("sdpa_kernel", "default") != "default":
        name += f"-sdpa_{overrides['sdpa_kernel']}"
    if overrides.get("dropout_impl", "triton") != "triton":
        name += f"-dropout_{overrides['dropout_impl']}"
    if "dropout" in overrides:
        name += f"-dropout{overrides['dropout']:g}"
    for key, value in overrides.items():
        if key not in ("sdpa_kernel", "dropout_impl", "dropout", "attn_dropout"):
            name += f"-{key}_{value}"
    return name


def methods_record_name(methods: list[str], train_name: str) -> str:
    """`methods-<m1>-<m2>...-<preset>-b<batch>-...`: a `train_record_name` for several methods."""
    return f"methods-{'-'.join(methods)}-{train_name.removeprefix('train-')}"


def run_train_cli(args: argparse.Namespace) -> int:
    if args.steps < 30:
        raise SystemExit("--steps must be >= 30 for a meaningful median")
    if args.attention_only:
        for batch in args.batch_size:
            rows = bench_attention(args.preset, batch, args.steps)
            write_record(f"attention-{args.preset}-b{batch}", {"results": rows}, args.out_dir)
        return 0
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for batch, compiled, kernel, impl in itertools.product(args.batch_size, modes, args.sdpa_kernel,
                                                           args.dropout_impl):
        overrides = {"sdpa_kernel": kernel, "dropout_impl": impl, **apply_overrides({}, args.model)}
        if args.dropout is not None:
            overrides.update(dropout=args.dropout, attn_dropout=args.dropout)
        name = train_record_name(args.preset, batch, args.dtype, args.compile_mode if compiled else None,
                                 overrides)
        if args.method != ["lease"]:
            settings = dict(preset=args.preset, batch_size=batch, dtype=args.dtype, compile=compiled, steps=args.steps,
                            warmup=args.warmup * (3 if compiled else 1), codebook_size=args.codebook_size,
                            codebook_dim=args.codebook_dim, model_overrides=overrides, compile_mode=args.compile_mode)
            name = methods_record_name(args.method, name)
            result = bench_methods(args.method, **settings)
            write_record(name, {"results": result}, args.out_dir)
            log.info("%s: %s img/s; %s", name, result["images_per_s"], result["ratios"])
            continue
        profile_to = results_dir(args.out_dir) / f"{name}.profile.txt" if args.profile else None
        result = bench_train(args.preset, batch, args.dtype, compiled, args.steps,
                             args.warmup * (3 if compiled else 1), args.codebook_size, args.codebook_dim,
                             model_overrides=overrides, profile_to=profile_to, compile_mode=args.compile_mode)
        write_record(name, {"results": result}, args.out_dir)
        log.info("%s: %.0f img/s, %.1f ms/step, MFU %.1f%%, peak %.1f GiB", name, result["images_per_s"],
                 result["median_ms_per_step"], 100 * result["mfu"], result["peak_memory_gib"])
    return 0
