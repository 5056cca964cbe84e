"""Loss and gradient norm of the first ViT-B training steps on `lease bench train`'s synthetic setup,
with an attention backend compiled or eager; needs a CUDA GPU.

    python benchmarks/exploratory/split_cls_gradients.py split_cls compiled 5
    python benchmarks/exploratory/split_cls_gradients.py split_cls eager 5
    python benchmarks/exploratory/split_cls_gradients.py sdpa compiled 5

Training refuses split_cls under torch.compile; this script compiles the step
itself to show why (README, "Training speed").
"""
import logging
import sys

import torch

from lease.bench import synthetic_trainer
from lease.configs import TrainConfig, model_config

BATCH, CODEBOOK, CODEBOOK_DIM = 256, 16384, 768  # lease bench train's defaults


def main(backend: str, mode: str, steps: int) -> None:
    cfg = TrainConfig(preset="vit_base", model=model_config("vit_base", attention_backend=backend),
                      batch_size=BATCH, dtype="bf16", compile=False, max_steps=10**9)
    trainer, data = synthetic_trainer(cfg, CODEBOOK, CODEBOOK_DIM, torch.device("cuda"))
    if mode == "compiled":  # past TrainConfig's refusal
        trainer.forward = torch.compile(trainer.model)
    for step in range(steps):
        metrics = {k: round(float(v), 4) for k, v in trainer.step(next(data)).items()}
        logging.info("%s %s step %d: %s", backend, mode, step, metrics)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
