"""`lease bench kernels`: the training step's building blocks timed alone on the GPU, against their floors.

* ceilings: a device-to-device copy (bytes read + written per second) and an 8192³ bf16 matmul, the
  two rates every floor below is divided by;
* attention forward + backward at the preset's encoder ([CLS] + kept tokens) and decoder ([CLS] +
  canvas) shapes with the preset's attention dropout: SDPA's cuDNN, flash and efficient kernels on
  views of one packed projection (as the model calls them), and `lease.kernels_attention` for a sweep
  of tile shapes per pass (forward, dK/dV, dQ), each pass also timed alone;
* the blocks' linears (fc1, fc2, qkv at the decoder's rows), forward + backward compiled, in bf16 and
  through torchao's float8 training (`model.matmul_dtype=fp8`), where torchao is installed;
* dropout + residual add + LayerNorm forward + backward at the encoder's and decoder's rows: compiled
  torch ops against `lease.kernels_norm` (`model.fused_kernels=on`), over its bytes at the copy rate.

Floors: attention's FLOPs (4·M·N·d per head forward, 2.5× that backward, + 2·M·N·d for the dQ pass's
recomputed scores) over the matmul ceiling, and its bytes (q, k, v, O, dO, dq, dk, dv once) over the copy
rate. One record, `kernels-<preset>-b<batch>.json`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from benchmarks.records import write_record
from lease.configs import MaskConfig, model_config
from lease.dropout import drop_threshold
from lease.model import SDPA_KERNELS

log = logging.getLogger(__name__)

ATTENTION_SWEEP = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass of lease.kernels_attention
    "fwd": [(64, 64, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2)],
    "dkdv": [(64, 64, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2)],
    "dq": [(64, 64, 8, 2), (128, 64, 8, 2)],
}


def median_ms(fn: Callable[[], Any], rep_ms: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def ceilings() -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s) measured on random data."""
    src = torch.randn(2**29 // 2, device="cuda", dtype=torch.bfloat16)  # 512 MiB, well past the L2
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: a @ b)
    return {"copy_gb_per_s": round(2 * src.numel() * 2 / copy_ms / 1e6, 1),
            "bf16_matmul_tflops": round(2 * 8192**3 / mm_ms / 1e9, 1)}


def attention_floor_ms(b: int, h: int, m: int, n: int, d: int, ceil: dict[str, float]) -> dict[str, float]:
    """Forward + backward matmul FLOPs per head (forward S and PV: 4·M·N·d; backward S, dP, dV, dK, dQ:
    10·M·N·d) over the matmul ceiling, and the bytes that must move (q, O, dO, dq; k, v, dk, dv) over the
    copy rate."""
    flops = 14 * b * h * m * n * d  # forward 4, backward 10 (S, dP, dV, dK, dQ: 2 each)
    bytes_moved = 2 * b * h * d * (2 * m + 2 * n + 2 * m + 2 * n)  # q, O, dO, dq and k, v, dk, dv
    return {"gflop": round(flops / 1e9, 2), "flop_floor_ms": round(flops / ceil["bf16_matmul_tflops"] / 1e9, 3),
            "byte_floor_ms": round(bytes_moved / ceil["copy_gb_per_s"] / 1e6, 3)}


def sdpa_fwd_bwd(kernel, b: int, h: int, n: int, d: int, p: float) -> Callable[[], Any]:
    """Forward + backward of one pinned SDPA kernel on q, k, v views of one packed projection leaf, as
    the model calls it."""
    packed = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)

    def run():
        q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
        with sdpa_kernel([kernel]):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        torch.autograd.grad(out, packed, grad)
    return run


def _triton_passes(b: int, h: int, n: int, d: int, p: float, blocks: dict) -> dict[str, Callable[[], Any]]:
    from lease import kernels_attention as ka

    c = h * d
    qkv = torch.randn(b, n, 3 * c, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(b, n, c, device="cuda", dtype=torch.bfloat16)
    seed = ka.philox_seed(qkv.device)
    thr = drop_threshold(p)
    out, lse = ka._launch_fwd(qkv, qkv, seed, h, c, 0, c, 2 * c, True, thr, blocks)
    dqkv = torch.empty_like(qkv)
    return {"fwd": lambda: ka._launch_fwd(qkv, qkv, seed, h, c, 0, c, 2 * c, True, thr, blocks),
            "bwd": lambda: ka._launch_bwd(grad, qkv, qkv, out, lse, seed, dqkv, dqkv, h, 0, c, 2 * c, 0, c, 2 * c,
                                          True, thr, blocks)}


def bench_attention(preset: str, batch: int, ceil: dict[str, float], parts: tuple[str, ...] = ("encoder", "decoder"),
                    sweep_tiles: bool = True) -> dict[str, Any]:
    from lease import kernels_attention as ka

    cfg = model_config(preset)
    kept = cfg.seq_len - math.ceil(cfg.seq_len * MaskConfig().ratio_min)
    shapes = {"encoder": (cfg.num_heads, kept + 1, cfg.embed_dim // cfg.num_heads),
              "decoder": (cfg.decoder_num_heads, cfg.seq_len + 1, cfg.decoder_embed_dim // cfg.decoder_num_heads)}
    p = cfg.attn_dropout
    result: dict[str, Any] = {}
    for part, (h, n, d) in ((part, shapes[part]) for part in parts):
        row: dict[str, Any] = {"batch": batch, "heads": h, "tokens": n, "head_dim": d, "dropout": p,
                               **attention_floor_ms(batch, h, n, n, d, ceil), "sdpa_fwd_bwd_ms": {}}
        for name in ("cudnn", "flash", "efficient"):
            try:
                row["sdpa_fwd_bwd_ms"][name] = round(median_ms(sdpa_fwd_bwd(SDPA_KERNELS[name], batch, h, n, d, p)), 3)
            except RuntimeError as err:
                row["sdpa_fwd_bwd_ms"][name] = f"unsupported: {str(err).splitlines()[0]}"
        sweep: dict[str, dict[str, float]] = {"fwd": {}, "bwd_dkdv": {}, "bwd_dq": {}}
        best = dict(ka.DEFAULT_BLOCKS)
        for pass_name in ("fwd", "dkdv", "dq") if sweep_tiles else ():
            times = {}
            for config in ATTENTION_SWEEP[pass_name]:
                if (n - 1) % config[1]:
                    continue
                blocks = {**best, pass_name: config}
                try:
                    fns = _triton_passes(batch, h, n, d, p, blocks)
                    if pass_name == "fwd":
                        ms = median_ms(fns["fwd"])
                    else:  # time the whole backward with the other pass at its best so far
                        ms = median_ms(fns["bwd"])
                except Exception as err:  # a config that does not compile (shared memory, registers)
                    log.warning("%s %s %s failed: %s", part, pass_name, config, str(err).splitlines()[0])
                    continue
                times[str(config)] = round(ms, 3)
            key = "fwd" if pass_name == "fwd" else f"bwd_{pass_name}"
            sweep[key] = times
            if times:
                best[pass_name] = tuple(int(x) for x in min(times, key=times.get).strip("()").split(","))
        fns = _triton_passes(batch, h, n, d, p, best)
        fwd_ms, bwd_ms = median_ms(fns["fwd"]), median_ms(fns["bwd"])
        no_drop = _triton_passes(batch, h, n, d, 0.0, best)  # what the in-kernel masks cost
        row.update({"triton_sweep_ms": sweep, "triton_best_blocks": {k: list(v) for k, v in best.items()},
                    "triton_fwd_ms": round(fwd_ms, 3), "triton_bwd_ms": round(bwd_ms, 3),
                    "triton_fwd_bwd_ms": round(fwd_ms + bwd_ms, 3),
                    "triton_fwd_bwd_ms_dropout0": round(median_ms(no_drop["fwd"]) + median_ms(no_drop["bwd"]), 3)})
        log.info("%s attention %s: triton %.3f ms (fwd %.3f, bwd %.3f; dropout 0: %.3f), sdpa %s, floors %s / %s "
                 "ms, tiles %s", part, (batch, h, n, d), fwd_ms + bwd_ms, fwd_ms, bwd_ms,
                 row["triton_fwd_bwd_ms_dropout0"], row["sdpa_fwd_bwd_ms"], row["flop_floor_ms"],
                 row["byte_floor_ms"], sweep)
        result[part] = row
    return result


def bench_linears(preset: str, batch: int, ceil: dict[str, float]) -> dict[str, Any]:
    """fc1, fc2 and qkv at the decoder's rows, forward + backward, compiled; bf16 and torchao float8."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        return {"error": "torchao is not installed"}
    cfg = model_config(preset)
    rows = batch * (cfg.seq_len + 1)
    d, hidden = cfg.decoder_embed_dim, int(cfg.decoder_embed_dim * cfg.mlp_ratio)
    out: dict[str, Any] = {}
    for name, (k, n) in {"fc1": (d, hidden), "fc2": (hidden, d), "qkv": (d, 3 * d)}.items():
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
        entry: dict[str, Any] = {"rows": rows, "in": k, "out": n,
                                 "bf16_flop_floor_ms": round(6 * rows * k * n / ceil["bf16_matmul_tflops"] / 1e9, 3)}
        for dtype in ("bf16", "fp8"):
            layer = torch.nn.Sequential(torch.nn.Linear(k, n)).cuda()
            if dtype == "fp8":
                convert_to_float8_training(layer)
            compiled = torch.compile(layer)

            def step():
                with torch.autocast("cuda", torch.bfloat16):
                    y = compiled(x)
                y.backward(grad)
            try:
                entry[f"{dtype}_fwd_bwd_ms"] = round(median_ms(step), 3)
            except Exception as err:
                entry[f"{dtype}_fwd_bwd_ms"] = f"failed: {str(err).splitlines()[0]}"
        out[name] = entry
        log.info("linear %s %s", name, entry)
    return out


NORM_ROWS_SWEEP = (1, 2, 4, 8)  # rows per program of lease.kernels_norm, forward and backward
NORM_BYTES_PER_ELEMENT = {  # what each pass must move per element at least, fp32 stream, bf16 branch
    "forward": 4 + 2 + 1 / 8 + 4 + 2,  # read x, branch, mask bit; write s, y
    "backward": 2 + 4 + 4 + 1 / 8 + 4 + 2,  # read ∂y, ∂s, s, mask bit; write ∂x, ∂branch
}


def bench_norm(preset: str, batch: int, ceil: dict[str, float]) -> dict[str, Any]:
    """Dropout + residual add + LayerNorm, forward + backward, at the encoder's and decoder's rows: the
    compiled torch ops (what `fused_kernels=off` runs) against `lease.kernels_norm` per rows-per-program."""
    from lease import kernels_norm
    from lease.dropout import Dropout, keep_bits

    cfg = model_config(preset)
    kept = cfg.seq_len - math.ceil(cfg.seq_len * MaskConfig().ratio_min)
    p = cfg.dropout
    drop = Dropout(p, cfg.dropout_impl).train()
    result: dict[str, Any] = {}
    shapes = {"encoder": (batch * (kept + 1), cfg.embed_dim), "decoder": (batch * (cfg.seq_len + 1),
                                                                        cfg.decoder_embed_dim)}
    for part, (rows, c) in shapes.items():
        norm = torch.nn.LayerNorm(c, eps=cfg.ln_eps).cuda()

        def residual_then_norm(x, branch, norm=norm):  # the next linear reads LayerNorm's output in bf16
            s = x + drop(branch)
            return s, norm(s).to(torch.bfloat16)

        plain = torch.compile(residual_then_norm)
        x = torch.randn(rows, c, device="cuda", requires_grad=True)
        branch = torch.randn(rows, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        ds, dy = torch.randn_like(x), torch.randn_like(branch)

        def compiled_step():
            with torch.autocast("cuda", torch.bfloat16):
                s, y = plain(x, branch)
            torch.autograd.grad([s, y], [x, branch, norm.weight, norm.bias], [ds, dy])

        floor = sum(NORM_BYTES_PER_ELEMENT.values()) * rows * c / ceil["copy_gb_per_s"] / 1e6
        row: dict[str, Any] = {"rows": rows, "features": c, "byte_floor_ms": round(floor, 3),
                               "compiled_torch_fwd_bwd_ms": round(median_ms(compiled_step), 3)}
        threshold, packed = drop_threshold(p), keep_bits(rows * c, p, x.device)
        s, y = torch.empty_like(x), torch.empty_like(branch)
        mean, rstd = torch.empty(rows, device="cuda"), torch.empty(rows, device="cuda")
        dx, dbranch = torch.empty_like(x), torch.empty_like(branch)
        for per_program in NORM_ROWS_SWEEP:
            def fused_step():
                kernels_norm.launch_forward(x, branch, packed, norm.weight, norm.bias, norm.eps, threshold, s, y,
                                            mean, rstd, per_program)
                kernels_norm.launch_backward(dy, ds, s, mean, rstd, norm.weight, packed, threshold, dx, dbranch,
                                             per_program)
            row[f"fused_rows{per_program}_fwd_bwd_ms"] = round(median_ms(fused_step), 3)
        log.info("dropout + residual + LayerNorm %s %s", part, row)
        result[part] = row
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="vit_base")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--parts", nargs="+", default=["attention", "linears", "norm"],
                        choices=["attention", "linears", "norm"])
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--attention-parts", nargs="+", default=["encoder", "decoder"], choices=["encoder", "decoder"])
    parser.add_argument("--no-sweep", action="store_true", help="time the default tiles only")
    parser.add_argument("--blocks-to", default=None,
                        help="write the sweep's best tiles (the slower attention part's) as LEASE_ATTENTION_BLOCKS JSON")


def run_cli(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("lease bench kernels needs a CUDA GPU")
    ceil = ceilings()
    log.info("ceilings: %s", ceil)
    record: dict[str, Any] = {"ceilings": ceil}
    for part in args.parts:
        if part == "attention":
            record[part] = bench_attention(args.preset, args.batch_size, ceil, tuple(args.attention_parts),
                                           not args.no_sweep)
        elif part == "norm":
            record[part] = bench_norm(args.preset, args.batch_size, ceil)
        else:
            record[part] = bench_linears(args.preset, args.batch_size, ceil)
        path = write_record(f"kernels-{args.preset}-b{args.batch_size}", {"results": record}, args.out_dir)
    if args.blocks_to and "attention" in record:  # the slower part's best tiles, for the runs that follow
        slowest = max(record["attention"].values(), key=lambda row: row["triton_fwd_bwd_ms"])
        Path(args.blocks_to).write_text(json.dumps(slowest["triton_best_blocks"]))
    log.info("record: %s", path)
    return 0

