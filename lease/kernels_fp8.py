"""FP8 matmuls for training (`model.matmul_dtype=fp8`) through torchao's float8 training.

torchao swaps each chosen `nn.Linear` for its `Float8Linear` (same parameters, same state-dict keys):
the forward and both backward matmuls run on e4m3 operands with one dynamic scale per tensor
(amax / max representable), accumulated in fp32 and returned in the autocast dtype. Only the blocks'
linears are swapped (attention qkv / proj, MLP fc1 / fc2: 93 % of the ViT-B step's matmul FLOPs);
the embeddings, the decoder's input projection, the MLM head and the contrast projection stay in bf16,
as do the last decoder block's row-subset projections (`Attention._attend_rows` calls F.linear on the
weights directly). Needs a GPU with FP8 matrix units (sm89+) and the `torchao` package.
"""
from __future__ import annotations

import torch.nn as nn

FP8_MIN_DIM = 16  # torchao's float8 matmul needs both dims divisible by 16


def _block_linear(module: nn.Module, fqn: str) -> bool:
    return (isinstance(module, nn.Linear) and "blocks." in fqn and module.in_features % FP8_MIN_DIM == 0
            and module.out_features % FP8_MIN_DIM == 0)


def float8_training(model: nn.Module) -> nn.Module:
    """Swap the transformer blocks' linears for torchao's Float8Linear (tensorwise dynamic scaling), in place."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("model.matmul_dtype=fp8 needs torchao (pip install torchao)") from err
    return convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=_block_linear)
