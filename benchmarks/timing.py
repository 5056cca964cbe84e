"""Timing one call at a time: CUDA events on the GPU, the wall clock elsewhere."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch


def time_cuda(fn: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    """Milliseconds per call, each call bracketed by CUDA events (host waits only at the end)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def time_calls(fn: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Milliseconds per call: CUDA events on CUDA (one host sync at the end), wall clock otherwise."""
    if device.type == "cuda":
        return time_cuda(fn, warmup, steps)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times
