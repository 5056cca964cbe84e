"""Which inductor switch decides whether the compiled gradient of the summed [CLS] row is right?

    python benchmarks/exploratory/cls_row_inductor_switches.py

The row as q times k summed over the head dimension (`broadcast` in cls_row_compiled.py), compiled
with other `torch.compile` backends and with one inductor setting changed at a time, at the ViT-B
encoder and decoder shapes, q, k, v packed as in the model. Each line gives the relative error of dq,
dk and dv against fp64. On an H100 (torch 2.11.0, 2026-11-25) the eager, aot_eager and
aot_eager_decomp_partition backends and inductor without comprehensive padding read 1.7e-3; inductor
as it is, and with any one of the other switches, gave dq and dk errors from 1.5 to 6e34 (dv 1.7e-3).
On the CPU inductor does not pad and every line reads 1.6-1.7e-3.
"""
import logging

import torch
import torch._inductor.config as inductor_config

from cls_row_compiled import SHAPES, broadcast, errors  # the sibling script

SWITCHES = {
    "as is": {},
    "no comprehensive padding": {"comprehensive_padding": False},
    "no mix-order reduction": {"triton.mix_order_reduction": False},
    "no split reductions": {"split_reductions": False},
    "no persistent reductions": {"triton.persistent_reductions": False},
    "no loop reordering": {"loop_ordering_after_fusion": False},
    "no pattern matcher": {"pattern_matcher": False},
    "no shape padding": {"shape_padding": False},
}


def report(label: str, fn, device: torch.device) -> None:
    for part, shape in SHAPES.items():
        torch._dynamo.reset()
        dq, dk, dv = errors(fn(), *shape, True, device)
        logging.info("%-40s %-7s dq %.1e  dk %.1e  dv %.1e", label, part, dq, dk, dv)


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for backend in ("eager", "aot_eager", "aot_eager_decomp_partition"):
        report(f"backend {backend}", lambda: torch.compile(broadcast, backend=backend, dynamic=False), device)
    for label, patch in SWITCHES.items():
        with inductor_config.patch(patch):
            report(f"inductor, {label}", lambda: torch.compile(broadcast, dynamic=False), device)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
