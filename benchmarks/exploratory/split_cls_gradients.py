"""Loss and gradient norm of the first ViT-B training steps, as `lease bench train` sets them up, with an
attention backend compiled or eager; needs a CUDA GPU.

    python benchmarks/exploratory/split_cls_gradients.py split_cls compiled 5
    python benchmarks/exploratory/split_cls_gradients.py split_cls eager 5
    python benchmarks/exploratory/split_cls_gradients.py sdpa compiled 5

Training refuses split_cls with attention dropout under torch.compile; this script compiles the step
itself to show why (README, "Training speed").
"""
import logging
import sys

import torch

from lease.configs import TrainConfig, model_config
from lease.data import ResidentBatches
from lease.synthetic import uniform_tokens
from lease.train import Dist, Trainer, build_model

BATCH, CODEBOOK, CODEBOOK_DIM = 256, 16384, 768


def main(backend: str, mode: str, steps: int) -> None:
    device = torch.device("cuda")
    cfg = TrainConfig(preset="vit_base", model=model_config("vit_base", attention_backend=backend),
                      batch_size=BATCH, dtype="bf16", compile=False, max_steps=10**9)
    model = build_model(cfg, torch.randn(CODEBOOK, CODEBOOK_DIM))
    tokens = uniform_tokens(BATCH * 8, model.cfg.seq_len, model.cfg.vocab_gen, CODEBOOK, seed=0)
    batches = ResidentBatches(tokens, BATCH, device, seed=0)
    trainer = Trainer(cfg, model, device, Dist(), batches.steps_per_epoch)
    if mode == "compiled":
        trainer.forward = torch.compile(trainer.model)
    data = batches.iterate(0)
    for step in range(steps):
        metrics = {k: round(float(v), 4) for k, v in trainer.step(next(data)).items()}
        logging.info("%s %s step %d: %s", backend, mode, step, metrics)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
