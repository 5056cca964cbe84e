"""Where split_cls's time goes: the kernels of its compiled forward + backward at the ViT-B encoder and
decoder shapes (attention dropout 0.1), as the trainer compiles it, on one GPU.

    TORCH_LOGS=output_code python benchmarks/exploratory/split_cls_kernels.py 2> inductor_code.txt

Prints, per shape, the number of graphs dynamo compiled and each kernel's time per call of the whole
forward + backward (torch.profiler, 10 calls after warm-up), the largest first.
"""
import collections

import torch
import torch._dynamo
from torch.profiler import ProfilerActivity, profile

from lease.attention import split_cls_attention
from lease.train import compile_for_training

SHAPES = {"encoder": (12, 129, 64), "decoder": (16, 257, 48)}  # heads, tokens, head dim (ViT-B)
BATCH, CALLS = 256, 10


def fwd_bwd(fn, leaves, grad):
    out = fn(*(t.transpose(1, 2) for t in leaves), 0.1)
    torch.autograd.grad(out, leaves, grad.transpose(1, 2))


def main() -> None:
    fn = compile_for_training(split_cls_attention, "default", dynamic=False)
    for part, (heads, tokens, head_dim) in SHAPES.items():
        packed = torch.randn(BATCH, tokens, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        leaves = [t.detach().requires_grad_() for t in packed.unbind(2)]
        grad = torch.randn(BATCH, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            fwd_bwd(fn, leaves, grad)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(CALLS):
                fwd_bwd(fn, leaves, grad)
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
