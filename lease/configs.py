"""Typed configuration of the LEASE model, its losses, masking and training, with named presets.

Defaults follow DESIGN.md "LEASE, exactly" (paper table A.1 and the authors' code). Where the paper and
the authors' code disagree (dropout: 0.5 printed vs 0.1 in code) the code's value is the default and
the other is one switch away (`model.dropout=0.5`).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from lease.typed_config import ConfigError, from_dict, require

# The table-8 placements: ours ("decoder": eq. 4 at every decoder position; "both": the mean of EC and
# DC) and the authors' ("decoder_authors": hard CE to the token's own centroid at the masked positions;
# "both_authors": EC + that DC, each weighted by λ)
ContrastPlacement = Literal["none", "encoder", "decoder", "both", "decoder_authors", "both_authors"]
ENCODER_CONTRAST = ("encoder", "both", "both_authors")
DECODER_CONTRAST = ("decoder", "both", "decoder_authors", "both_authors")
# "lease": eq. 5 (reconstruction + codebook contrast); "sorcen": reconstruction + echo contrast (the
# Sorcen supplement); "mage": reconstruction only on the precomputed tokens (MAGE_precomp, supplement
# table D.7); "mage_online": MAGE as published, tokenizing augmented images in the step (`lease.online`)
Method = Literal["lease", "sorcen", "mage", "mage_online"]
METHOD_DESCRIPTIONS = {
    "lease": "LEASE: reconstruction + codebook contrast (eq. 5) on the precomputed tokens",
    "sorcen": "Sorcen: reconstruction + echo contrast (EMA teacher) on the precomputed tokens",
    "mage": "MAGE on the precomputed tokens: reconstruction only (MAGE_precomp)",
    "mage_online": "MAGE as published: reconstruction of the VQGAN codes of augmented images, tokenized in the step",
}
AUTHORS_EMA_EPOCHS = 1600.0  # the β schedule's length hard-coded in the authors' Sorcen code
# The MAGE/Sorcen vocabulary (their code: codebook_size + 1000 + 1, fake class label codebook_size + 1100 - 1024,
# [MASK] last): the codes, 1000 rows of their class-conditional layout (unused here), [MASK]; [CLS] inside them
MAGE_CLASS_ROWS = 1000
MAGE_CLS_OFFSET = 1100 - 1024


@dataclass
class ModelConfig:
    """Encoder/decoder sizes and the token vocabulary (codes + [CLS] + [MASK])."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-6
    mlm_ln_eps: float = 1e-5  # the MLM head's LayerNorm uses torch's default eps in the authors' code
    vocab_gen: int = 1024  # V_gen: generative (VQGAN) codes; only these logits are trained
    # Where [CLS] and [MASK] go when not set: "compact" (LEASE) V_gen + 2 rows, [CLS] V_gen, [MASK] V_gen + 1;
    # "mage" (MAGE, Sorcen) V_gen + 1000 + 1 rows, [CLS] V_gen + 76, [MASK] last (2025, 1100, 2024 for 1024 codes)
    vocab_layout: Literal["compact", "mage"] = "compact"
    vocab_size: int | None = None  # token-embedding rows; default from vocab_layout
    cls_token_id: int | None = None  # default from vocab_layout
    mask_token_id: int | None = None  # default vocab_size - 1
    grid_size: int = 16  # tokens per side; sequence length = grid_size**2
    decoder_pos_rows: int | None = None  # learned decoder positions; default seq_len + 1
    dropout: float = 0.1
    attn_dropout: float = 0.1
    # Mask RNG of the dropout layers outside attention in compiled CUDA training: "triton" draws eight
    # 16-bit uniforms per Philox call (drop probability round(p·2¹⁶)/2¹⁶; see lease/dropout.py), "torch"
    # uses torch's kernel. Eager and CPU runs always use torch's.
    dropout_impl: Literal["triton", "torch"] = "triton"
    # Training: the decoder's last block, its norm and the MLM head run only at the masked positions,
    # the only ones a loss reads unless the contrast is on the decoder. Same losses; less compute.
    decode_masked_only: bool = True
    codebook_dim: int | None = None  # set from the codebook file when the model is built
    contrast_on: ContrastPlacement = "encoder"
    num_classes: int = 0  # online (detached) linear classifier for monitoring: 0 off, -1 from the labels
    # "split_cls": cuDNN's kernel on the tokens after [CLS], the [CLS] row and column merged in through
    # the log-sum-exp by Triton kernels that read the packed projection (lease/attention.py); the same
    # attention, no kernel tile spent on one token. CUDA in 16 bits (sm80+), always through cuDNN
    # (sdpa_kernel does not apply); elsewhere plain SDPA runs. "auto": flash-attn when installed; else
    # split_cls in training at [CLS] + a multiple of 64 keys, at least 256 (ViT-B's decoder: 2,057
    # against 2,016 img/s on one H200), and SDPA elsewhere (the encoder's 129 tokens, evaluation).
    # "triton": lease/kernels_attention.py, attention dropout inside one Triton kernel per pass with the
    # [CLS] query and key in 16-wide tiles, reading the packed projection (CUDA, 16 bits, [CLS] + a multiple
    # of 64 tokens; SDPA elsewhere). Correct, but slower than SDPA's cuDNN at ViT-B's shapes on an H200
    # (1.52 vs 1.14 ms encoder, 5.54 vs 2.96 ms decoder per layer; benchmarks/README.md, issue 28).
    attention_backend: Literal["sdpa", "flash_attn", "split_cls", "triton", "auto"] = "auto"
    # SDPA kernel: "default" lets PyTorch choose; the others pin one (`lease bench train --attention-only`
    # times them at the model's shapes: short sequences of 129/257 tokens favour some kernels over others).
    sdpa_kernel: Literal["default", "cudnn", "flash", "efficient", "math"] = "default"
    # Residual stream under 16-bit autocast: "fp32" as the authors' code (fp32 embeddings plus 16-bit
    # branch outputs promote to fp32), "autocast" rounds each residual sum to the autocast dtype, as
    # Megatron-LM does by default: half the bytes in every LayerNorm and residual add, other rounding.
    # Without autocast (CPU, fp32 runs) both are the same.
    residual_dtype: Literal["fp32", "autocast"] = "fp32"
    # "on": in CUDA training each dropout + residual add + LayerNorm of the blocks (and the final norms)
    # runs as one Triton kernel forward and one backward that also sums the LayerNorm's weight gradients
    # (lease/kernels_norm.py); the MLP's residual add is carried into the next block's norm1. Same
    # arithmetic, other dropout masks than "off" (the Philox keys are drawn in another order). Off
    # elsewhere (CPU, evaluation) and by default: not yet timed on a GPU (issue 28).
    fused_kernels: Literal["off", "on"] = "off"
    # Matmul operands of the transformer blocks' linears: "fp8" runs them through torchao's float8
    # training (e4m3, one dynamic scale per tensor; lease/kernels_fp8.py), CUDA sm89+ only.
    matmul_dtype: Literal["bf16", "fp8"] = "bf16"
    # Layout switches between the methods (the authors' LEASE vs their MAGE/Sorcen code): LEASE adds a
    # fixed 2-D sin-cos table to the patch positions and fills each kept unmasked canvas slot with
    # [CLS] latent + its latent; MAGE and Sorcen add no table and put the latent alone.
    pos_embed_2d: bool = True
    decoder_canvas: Literal["cls_plus_latent", "latent"] = "cls_plus_latent"
    # Monitoring classifier: 0 = one linear layer; > 0 = the authors' MLP (E → hidden → ReLU → classes)
    classifier_hidden: int = 0
    # Sorcen's echo branch: an EMA teacher (own blocks, momentum projector), projector and predictor
    # (each Linear → BatchNorm1d → ReLU → Linear). The authors' widths: [E, 4096, 512], [512, 2048, 512].
    echo_contrast: bool = False
    # Class-conditional decoder (paper §4.4, `lease.condgen`): cond_classes > 0 appends to the decoder's
    # canvas a class token, a linear map of the class's CLIP text feature (cond_text_dim wide), or a learned
    # null token with probability cond_null_prob in training (classifier-free guidance); cond_tail
    # "centroids" also appends each patch's discriminative centroid, mapped linearly, at the decoder's own
    # learned grid positions ("shared") or a table of its own ("own").
    cond_classes: int = 0
    cond_text_dim: int = 512
    cond_tail: Literal["none", "centroids"] = "none"
    cond_tail_positions: Literal["shared", "own"] = "shared"
    cond_null_prob: float = 0.1
    projector_hidden: int = 4096
    projector_dim: int = 512
    predictor_hidden: int = 2048

    def __post_init__(self) -> None:
        mage = self.vocab_layout == "mage"
        if self.vocab_size is None:
            self.vocab_size = self.vocab_gen + (MAGE_CLASS_ROWS + 1 if mage else 2)
        if self.cls_token_id is None:
            self.cls_token_id = self.vocab_gen + MAGE_CLS_OFFSET if mage else self.vocab_size - 2
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size - 1
        if self.decoder_pos_rows is None:
            self.decoder_pos_rows = self.seq_len + 1
        require(self.depth >= 1, "depth", "must be >= 1")
        require(self.decoder_depth >= 1, "decoder_depth", "must be >= 1")
        require(self.embed_dim % self.num_heads == 0, "embed_dim", "must be divisible by num_heads")
        require(self.decoder_embed_dim % self.decoder_num_heads == 0, "decoder_embed_dim",
                "must be divisible by decoder_num_heads")
        require(self.vocab_size >= self.vocab_gen + 2, "vocab_size", "must hold the codes plus [CLS] and [MASK]")
        for name in ("cls_token_id", "mask_token_id"):
            value = getattr(self, name)
            require(self.vocab_gen <= value < self.vocab_size, name,
                    f"must lie in [vocab_gen={self.vocab_gen}, vocab_size={self.vocab_size})")
        require(self.cls_token_id != self.mask_token_id, "mask_token_id", "must differ from cls_token_id")
        require(self.decoder_pos_rows >= self.seq_len + 1, "decoder_pos_rows", "must be >= seq_len + 1")
        require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        require(self.classifier_hidden >= 0, "classifier_hidden", "must be >= 0 (0: a linear classifier)")
        require(self.cond_classes >= 0, "cond_classes", "must be >= 0 (0: unconditional)")
        require(self.cond_text_dim >= 1, "cond_text_dim", "must be >= 1")
        require(0.0 <= self.cond_null_prob < 1.0, "cond_null_prob", "must be in [0, 1)")
        require(self.cond_tail == "none" or self.cond_classes > 0, "cond_tail", "needs cond_classes > 0")
        for name in ("projector_hidden", "projector_dim", "predictor_hidden"):
            require(getattr(self, name) >= 1, name, "must be >= 1")

    @property
    def seq_len(self) -> int:
        return self.grid_size * self.grid_size


@dataclass
class LossConfig:
    """Eq. 1 (label-smoothed CE), eq. 3-4 (codebook contrast) and eq. 5 (weighted sum)."""

    label_smoothing: float = 0.1
    contrast_weight: float = 0.1  # lambda in eq. 5
    contrast_tau: float = 0.1  # tau in eq. 4
    num_neighbours: int = 5  # n in eq. 2
    neighbour_tau: float = 0.1  # tau_w in eq. 3
    # Sorcen (supplement §A and the authors' code): NNCLR-style InfoNCE between the teacher's echo view
    # and the student's masked view, the uniformity term on the student's pooled latents, and the echo
    # itself: a draw from the top-k code logits without their maximum, inside a jittered square.
    echo_tau: float = 0.3
    echo_weight: float = 0.1  # λ of the supplement
    uniformity_weight: float = 0.01
    echo_top_k: int = 15  # K of the supplement
    echo_crop_min: int = 8  # side of the square, drawn once per batch from [min, max]
    echo_crop_max: int = 16

    def __post_init__(self) -> None:
        require(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
        require(self.contrast_tau > 0, "contrast_tau", "must be > 0")
        require(self.neighbour_tau > 0, "neighbour_tau", "must be > 0")
        require(self.num_neighbours >= 0, "num_neighbours", "must be >= 0")
        require(self.echo_tau > 0, "echo_tau", "must be > 0")
        require(self.echo_top_k >= 1, "echo_top_k", "must be >= 1")
        require(1 <= self.echo_crop_min <= self.echo_crop_max, "echo_crop_min",
                "need 1 <= echo_crop_min <= echo_crop_max")


@dataclass
class MaskConfig:
    """Variable masking ratio r ~ truncated normal on [min, max] (paper §3.1, table A.1)."""

    ratio_min: float = 0.5
    ratio_max: float = 1.0
    ratio_mode: float = 0.55
    ratio_std: float = 0.25
    # With model.decode_masked_only the decoded rows are padded (with unmasked, unscored positions) to a
    # multiple of this, and so are the encoder rows the contrast scores (with masked, unscored ones): a
    # handful of shapes instead of one per masked count, each with its own cuDNN attention plan and
    # compiled-kernel launch setup.
    decode_rows_multiple: int = 16

    def __post_init__(self) -> None:
        require(0.0 < self.ratio_min <= self.ratio_max <= 1.0, "ratio_min",
                "need 0 < ratio_min <= ratio_max <= 1")
        require(self.ratio_std > 0, "ratio_std", "must be > 0")
        require(self.decode_rows_multiple >= 1, "decode_rows_multiple", "must be >= 1")


@dataclass
class OptimConfig:
    """AdamW with MAE's parameter groups, lr = base_lr * batch / 256, warm-up then cosine per step."""

    base_lr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    grad_clip: float = 3.0


@dataclass
class DataConfig:
    """Packed WebDataset shards (pack stage) and the discriminative codebook."""

    shards: str = ""  # a directory of shards, a glob, or a brace pattern
    codebook: str = ""  # centroids .npy float32 [K, D]
    gpu_resident: Literal["auto", "on", "off"] = "auto"
    num_workers: int = 2
    shuffle_buffer: int = 2048


@dataclass
class EmaConfig:
    """Sorcen's teacher: β = 1 − (1 − base)(cos(π·epoch / E) + 1) / 2, one step before every forward."""

    base: float = 0.996
    # E: "run" = the run's length in epochs; "authors" = their constant 1600 whatever the run's length
    horizon: Literal["run", "authors"] = "run"
    echo_from_truth_epochs: float = 10.0  # the echo is built from the ground-truth tokens before this

    def __post_init__(self) -> None:
        require(0.0 <= self.base <= 1.0, "base", "must be in [0, 1]")
        require(self.echo_from_truth_epochs >= 0, "echo_from_truth_epochs", "must be >= 0")


@dataclass
class OnlineConfig:
    """`method: mage_online`: a manifest's images, MAGE's augmentation on the device and the VQGAN in the
    step (`lease.online`). The loader centre-crops each image to `source_size` (as the tokenize stage),
    the random resized crop is then taken from that square at the VQGAN's input size."""

    manifest: str = ""  # the manifest parquet (pipeline.manifest) whose train split is read
    vqgan_kind: Literal["maskgit", "taming"] = "maskgit"
    vqgan_checkpoint: str = ""
    vqgan_config: str = ""  # taming only
    source_size: int = 256
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    compile: Literal["auto", "on", "off"] = "auto"  # the VQGAN: "auto" compiles it on CUDA
    num_workers: int = 4  # decoding workers of the loader

    def __post_init__(self) -> None:
        require(0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0, "crop_scale", "need 0 < min <= max <= 1")
        require(0.0 < self.crop_ratio[0] <= 1.0 <= self.crop_ratio[1], "crop_ratio",
                "need min <= 1 <= max (the whole square is the fallback crop)")
        require(self.source_size >= 1, "source_size", "must be >= 1")
        require(self.num_workers >= 0, "num_workers", "must be >= 0")


@dataclass
class TrainConfig:
    """One pretraining run."""

    preset: str = "vit_base"
    method: Method = "lease"  # `METHOD_MODEL_PRESETS` gives each method's layout under the `model:` keys
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    batch_size: int = 4096  # global batch (over all ranks and accumulation steps)
    grad_accum: int = 1
    epochs: float = 1600.0
    max_steps: int = 0  # > 0 caps the run (tests, benchmarks)
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False
    # torch.compile mode: "reduce-overhead" adds CUDA graphs (fewer launches per step), the
    # "max-autotune" modes also search matmul kernels (minutes of compile time)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = "default"
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    classifier_lr: float = 1e-3
    # How the pipeline's pretrain stage starts the run (lease.launch): torchrun with nproc_per_node processes
    # per machine (0: one per visible GPU), on nnodes machines meeting at rdzv_endpoint (host:port).
    nproc_per_node: int = 0
    nnodes: int = 1
    rdzv_endpoint: str = ""

    def __post_init__(self) -> None:
        require(self.batch_size > 0, "batch_size", "must be > 0")
        require(self.grad_accum > 0, "grad_accum", "must be > 0")
        require(self.batch_size % self.grad_accum == 0, "batch_size", "must be divisible by grad_accum")
        require(self.epochs > 0 or self.max_steps > 0, "epochs", "need epochs > 0 or max_steps > 0")
        require(self.log_every > 0, "log_every", "must be > 0")
        require(self.nproc_per_node >= 0, "nproc_per_node", "must be >= 0 (0: one per visible GPU)")
        require(self.nnodes >= 1, "nnodes", "must be >= 1")
        require(self.nnodes == 1 or bool(self.rdzv_endpoint), "rdzv_endpoint",
                "several machines (nnodes > 1) meet at a rendezvous: give host:port")
        require(self.ckpt_every > 0, "ckpt_every", "must be > 0")
        require(self.model.echo_contrast == (self.method == "sorcen"), "model.echo_contrast",
                f"must be {self.method == 'sorcen'} for method={self.method!r} (set by the method's preset)")
        require(not self.model.echo_contrast or self.loss.echo_crop_max <= self.model.grid_size,
                "loss.echo_crop_max", f"the echo's square must fit the {self.model.grid_size}² grid")
        require(self.method == "lease" or self.model.contrast_on == "none", "model.contrast_on",
                f"the codebook contrast belongs to method 'lease', not {self.method!r}")


MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64, decoder_depth=2,
                 decoder_num_heads=4),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=768, decoder_depth=8,
                     decoder_num_heads=16),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=1024, decoder_depth=8,
                      decoder_num_heads=16),
}


# Each method's layout (DESIGN.md, issue 23): MAGE's and Sorcen's vocabulary is the codes + 1000 + 1 with
# [CLS] at codes + 76 and [MASK] last (their code's layout, from the tokenizer's code count: 2025/1100/2024
# for 1024 codes), no 2-D sin-cos, latents alone on the canvas, the authors' MLP classifier; `mage`,
# `mage_online` and `sorcen` train without the codebook contrast.
AUTHORS_MAGE_LAYOUT = dict(vocab_layout="mage", pos_embed_2d=False, decoder_canvas="latent", classifier_hidden=512,
                           contrast_on="none")
METHOD_MODEL_PRESETS: dict[str, dict] = {
    "lease": {},
    "sorcen": dict(AUTHORS_MAGE_LAYOUT, echo_contrast=True),
    "mage": AUTHORS_MAGE_LAYOUT,
    "mage_online": AUTHORS_MAGE_LAYOUT,
}


def model_config(preset: str, **overrides) -> ModelConfig:
    """A named preset (`tiny`, `vit_base`, `vit_large`) with keyword overrides."""
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"preset: unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    return from_dict(ModelConfig, {**MODEL_PRESETS[preset], **overrides}, prefix="model.")


def train_config(data: dict) -> TrainConfig:
    """Build a TrainConfig from plain data: `preset` fills model sizes and `method` the layout
    (`METHOD_MODEL_PRESETS`); `model:` keys override both."""
    data = dict(data)
    preset = data.get("preset", TrainConfig.preset)
    method_layout = METHOD_MODEL_PRESETS.get(data.get("method", TrainConfig.method), {})
    model_data = {**MODEL_PRESETS.get(preset, {}), **method_layout, **(data.pop("model", None) or {})}
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"preset: unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}")
    # the model first: some of TrainConfig's checks span both
    return from_dict(TrainConfig, {**data, "model": from_dict(ModelConfig, model_data, prefix="model.")})


def with_model(cfg: ModelConfig, **changes) -> ModelConfig:
    """A copy of `cfg` with fields changed and derived defaults re-derived where not set explicitly."""
    return dataclasses.replace(cfg, **changes)


CONDGEN_TEMPLATE = "An image of a {}"  # the class prompt of the Sorcen supplement (section I)
# Table A.5 (conditional generation setup); the mask law is pretraining's, the loss eq. 1 alone
TABLE_A5: dict[str, Any] = {
    "epochs": 300.0, "batch_size": 4096,
    "optim": {"base_lr": 1.5e-4, "weight_decay": 0.05, "betas": [0.9, 0.95], "warmup_epochs": 5.0, "grad_clip": 3.0},
    "loss": {"label_smoothing": 0.1},
    "model": {"dropout": 0.5, "contrast_on": "none"},
}


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, nested mappings merged key by key."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def condgen_train_config(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig with table A.5's values where `data` does not set them."""
    return train_config(_merged(TABLE_A5, data or {}))
