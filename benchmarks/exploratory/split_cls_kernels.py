"""Where split_cls's time goes: the kernels of its compiled forward + backward at the ViT-B encoder and
decoder shapes (attention dropout 0.1), as the trainer compiles it, on one GPU.

    TORCH_LOGS=output_code python benchmarks/exploratory/split_cls_kernels.py 2> inductor_code.txt

Prints, per shape, the number of graphs dynamo compiled and each kernel's time per call of the whole
forward + backward (torch.profiler, 10 calls after warm-up), the largest first.

With the merge in torch ops (commit c5b09de; one H200, 2026-12-04) the GPU time per call was 0.901 ms
(encoder) and 2.386 ms (decoder). cuDNN's kernels took 0.40 and 1.37 ms of it, the merge's 15 inductor
kernels and an eager copy of the output gradient the rest. That copy is AOTAutograd making the
standalone graph's tangent contiguous; inside the model's graph there is none. The merge is now Triton
kernels (lease/attention.py); this script has not been run on them yet.
"""
import collections

import torch
import torch._dynamo
from torch.profiler import ProfilerActivity, profile

from lease.attention import split_cls_self_attention
from lease.train import compile_for_training

SHAPES = {"encoder": (12, 129, 64), "decoder": (16, 257, 48)}  # heads, tokens, head dim (ViT-B)
BATCH, CALLS = 256, 10


def fwd_bwd(fn, packed, heads, grad):
    torch.autograd.grad(fn(packed, heads, 0.1), packed, grad)


def main() -> None:
    fn = compile_for_training(split_cls_self_attention, "default", dynamic=False)
    for part, (heads, tokens, head_dim) in SHAPES.items():
        width = heads * head_dim
        packed = torch.randn(BATCH, tokens, 3 * width, device="cuda", dtype=torch.bfloat16).requires_grad_()
        grad = torch.randn(BATCH, tokens, width, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            fwd_bwd(fn, packed, heads, grad)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(CALLS):
                fwd_bwd(fn, packed, heads, grad)
            torch.cuda.synchronize()
        per_kernel = collections.Counter()
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel[event.name] += event.device_time / CALLS
        print(f"{part} [{BATCH}, {heads}, {tokens}, {head_dim}]: {sum(per_kernel.values()) / 1000:.3f} ms per call, "
              f"graphs so far {torch._dynamo.utils.counters['stats']['unique_graphs']}")
        for name, us in per_kernel.most_common(25):
            print(f"  {us:9.1f} us  {name[:150]}")


if __name__ == "__main__":
    main()
