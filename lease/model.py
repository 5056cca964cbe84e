"""The model family of LEASE, Sorcen and MAGE: a token-input ViT encoder, a [CLS]-canvas decoder and
an MLM head (LEASE paper §3), with each method's own objective on top.

Layout and numerics follow the authors' code (MAGE lineage) so their checkpoints load by key
conversion (`lease.checkpoints.import_reference`):

    tokens ──mask/drop──► [CLS] + kept ids ──TokenEmbedding(+2-D sin-cos)──► blocks ► norm      (encoder)
    canvas[L+1] = [CLS] latent; kept-and-unmasked slots ← their latents; + learned positions
             ──► decoder blocks ► norm ► MLM head (tied to word embeddings) ──► code logits   (decoder)

Losses (`lease.losses`): eq. 1 on masked positions for every method; LEASE adds eq. 4 on kept unmasked
encoder tokens (eq. 5 total); Sorcen adds the echo contrast (`echo_losses`: an EMA teacher of its own
blocks on an echo drawn from the decoder's logits, InfoNCE and a uniformity term); MAGE adds nothing.
The layout differences (2-D sin-cos table, canvas fill, vocabulary) are `ModelConfig` switches.
In training the decoder's last block runs only at the rows a loss reads (`decode_masked_only`), and
the encoder contrast only at the kept unmasked rows (`MaskPlan.contrast_idx`).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel

from lease import kernels_attention
from lease.attention import (split_cls_pays, split_cls_rows_attention, split_cls_self_attention,
                            split_cls_supported)
from lease.codebook import NeighbourTable, neighbour_table
from lease.configs import DECODER_CONTRAST, ENCODER_CONTRAST, LossConfig, ModelConfig
from lease.dropout import Dropout
from lease.kernels_fp8 import float8_training
from lease.kernels_norm import dropout_add_layer_norm, fused_norm_available
from lease.losses import codebook_contrast_loss, info_nce_loss, reconstruction_loss, uniformity_loss
from lease.masking import EchoPlan, MaskPlan
from lease.sorcen import echo_support, sample_support, square_mask

log = logging.getLogger(__name__)

try:  # optional extra; PyTorch's SDPA is the default and fast on its own
    from flash_attn import flash_attn_qkvpacked_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_qkvpacked_func = None


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table [grid², dim] (MAE's layout: first half from the column index)."""
    if dim % 4:
        raise ValueError(f"embed_dim={dim} must be divisible by 4 for the 2-D sin-cos table")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, N, C] at row indices `rows` [B, M] → [B, M, C]."""
    return x.gather(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


SDPA_KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


class Attention(nn.Module):
    """Multi-head self-attention through SDPA, flash-attn, or SDPA's cuDNN kernel with the [CLS] row
    and column apart (`lease.attention`: at [CLS] + a multiple of 64 tokens, the one token would
    otherwise cost a whole kernel tile).

    `backend` is "sdpa", "flash_attn", "split_cls", "triton" (`lease.kernels_attention`: dropout in
    the kernel, the [CLS] row and column in 16-wide tiles) or "auto" (split_cls in training where it pays,
    SDPA elsewhere); all but SDPA apply to CUDA tensors in half precision (triton: at [CLS] + a multiple
    of its key tile) and SDPA takes the rest. `kernel` pins one SDPA kernel ("default": PyTorch's
    choice, and the only one under which "auto" takes split_cls, which always runs cuDNN); the math
    kernel stays allowed as a fallback for devices and dtypes the pinned one does not take (CPU, fp32).
    """

    def __init__(self, dim: int, num_heads: int, attn_dropout: float, proj_drop: Dropout, backend: str,
                 kernel: str = "default"):
        super().__init__()
        self.sdpa_backends = None if kernel == "default" else [SDPA_KERNELS[kernel], SDPBackend.MATH]
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout
        self.proj_drop = proj_drop
        self.backend = backend

    def forward(self, x: torch.Tensor, query_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over `x` [B, N, C]; with `query_rows` [B, M] only those rows' outputs [B, M, C]."""
        return self.proj_drop(self.branch(x, query_rows))

    def branch(self, x: torch.Tensor, query_rows: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` without the output dropout (the fused kernels apply it with the residual add)."""
        if query_rows is not None:
            return self._attend_rows(x, query_rows)
        b, n, c = x.shape
        qkv = self.qkv(x)
        drop = self.attn_dropout if self.training else 0.0
        # the projection's dtype: under autocast x stays fp32 while qkv comes out in 16 bits
        if self.backend == "flash_attn" and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16):
            out = flash_attn_qkvpacked_func(self._per_head(qkv), dropout_p=drop).reshape(b, n, c)
        elif self.backend == "triton" and kernels_attention.attention_supported(qkv, n, self.head_dim):
            out = kernels_attention.self_attention(qkv, self.num_heads, drop)  # reads the packed projection
        elif self._takes_split_cls(qkv, n):
            out = split_cls_self_attention(qkv, self.num_heads, drop)  # reads the packed projection
        else:
            out = self._sdpa(*self._heads(qkv), drop).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)

    def _attend_rows(self, x: torch.Tensor, query_rows: torch.Tensor) -> torch.Tensor:
        """Queries from the chosen rows only, keys and values from all rows (same weights as `qkv`).

        flash-attn's packed call wants queries and keys of one length, so that backend uses SDPA here."""
        b, n, c = x.shape
        rows = gather_rows(x, query_rows)
        m, drop = rows.shape[1], self.attn_dropout if self.training else 0.0
        q = F.linear(rows, self.qkv.weight[:c], self.qkv.bias[:c])
        kv = F.linear(x, self.qkv.weight[c:], self.qkv.bias[c:])
        if self.backend == "triton" and kernels_attention.attention_supported(q, n, self.head_dim):
            return self.proj(kernels_attention.rows_attention(q, kv, self.num_heads, drop))
        if self._takes_split_cls(q, n):
            return self.proj(split_cls_rows_attention(q, kv, self.num_heads, drop))
        out = self._sdpa(*self._heads(q), *self._heads(kv), drop)
        return self.proj(out.transpose(1, 2).reshape(b, m, c))

    def _takes_split_cls(self, x: torch.Tensor, n_keys: int) -> bool:
        """split_cls when chosen; under "auto" (no SDPA kernel pinned) in training at the key counts where it
        was measured faster than cuDNN on the whole sequence (`lease.attention.split_cls_pays`); and only
        where it can run (CUDA, 16 bits)."""
        auto = self.backend == "auto" and self.sdpa_backends is None and self.training
        chosen = self.backend == "split_cls" or (auto and split_cls_pays(n_keys))
        return chosen and split_cls_supported(x)

    def _per_head(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N, k·C] projections → a [B, N, k, heads, C / heads] view."""
        return t.view(t.shape[0], t.shape[1], -1, self.num_heads, self.head_dim)

    def _heads(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, N, k·C] projections → k views [B, heads, N, C / heads], SDPA's layout.

        Unbound along the projection's own axis and then transposed, so that the backward stacks the
        k gradients straight into the projection's [B, N, k, heads, C / heads] layout (rather than in
        [k, B, heads, N, ...] order, copied once more)."""
        return tuple(part.transpose(1, 2) for part in self._per_head(t).unbind(2))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, drop: float) -> torch.Tensor:
        with sdpa_kernel(self.sdpa_backends) if self.sdpa_backends else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=drop)


def resolve_attention_backend(choice: str) -> str:
    """model.attention_backend → the backend the blocks use: "auto" takes flash-attn when installed;
    otherwise it stays "auto", which the blocks read as split_cls where it pays and SDPA elsewhere."""
    if choice == "flash_attn" and flash_attn_qkvpacked_func is None:
        raise ImportError("model.attention_backend=flash_attn but flash-attn is not installed; "
                          "install the 'flash' extra or use attention_backend=sdpa")
    if choice == "auto":
        return "flash_attn" if flash_attn_qkvpacked_func is not None else "auto"
    return choice


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: Dropout):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.branch(x))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` without the output dropout (the fused kernels apply it with the residual add)."""
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block (timm layout: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)."""

    def __init__(self, dim: int, num_heads: int, cfg: ModelConfig, attention_backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.attn = Attention(dim, num_heads, cfg.attn_dropout, Dropout(cfg.dropout, cfg.dropout_impl),
                              attention_backend, cfg.sdpa_kernel)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.ln_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), Dropout(cfg.dropout, cfg.dropout_impl))
        self.residual_in_branch_dtype = cfg.residual_dtype == "autocast"
        self.dropout_p = cfg.dropout

    def forward(self, x: torch.Tensor, query_rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, C] → [B, N, C]; with `query_rows` [B, M] only those rows come out ([B, M, C])."""
        if query_rows is None:
            x = self._residual(x, self.attn(self.norm1(x)))
        else:
            x = self._residual(gather_rows(x, query_rows), self.attn(self.norm1(x), query_rows))
        return self._residual(x, self.mlp(self.norm2(x)))

    def forward_fused(self, x: torch.Tensor, pending: torch.Tensor | None,
                      query_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with each dropout + residual add + LayerNorm in one kernel (`lease.kernels_norm`).

        The residual stream enters as x + dropout(`pending`), the previous block's MLP output before
        its dropout (None for the first block), so that sum fuses with this block's norm1. Returns
        (the stream after the attention branch, this block's MLP output before its dropout)."""
        p, in_branch_dtype = self.dropout_p, self.residual_in_branch_dtype
        x, h = dropout_add_layer_norm(x, pending, self.norm1, p, in_branch_dtype)
        if query_rows is not None:
            x = gather_rows(x, query_rows)
        x, h = dropout_add_layer_norm(x, self.attn.branch(h, query_rows), self.norm2, p, in_branch_dtype)
        return x, self.mlp.branch(h)

    def _residual(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """x + branch; with `residual_dtype="autocast"` in the branch's dtype (16 bits under autocast,
        where x + branch would promote to fp32; unchanged without autocast)."""
        total = x + branch
        return total.to(branch.dtype) if self.residual_in_branch_dtype else total


class TokenEmbedding(nn.Module):
    """BERT-style embedding: word + learned position, LayerNorm, dropout (position ids given)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.position_embeddings = nn.Embedding(cfg.seq_len + 1, cfg.embed_dim)
        self.LayerNorm = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.dropout = Dropout(cfg.dropout, cfg.dropout_impl)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class MlmLayer(nn.Module):
    """MLM head: linear + GELU + LayerNorm, logits = h · E[:V_gen]ᵀ + b (E not updated through here)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.decoder_embed_dim, cfg.embed_dim)
        self.gelu = nn.GELU()
        self.ln = nn.LayerNorm(cfg.embed_dim, eps=cfg.mlm_ln_eps)
        self.bias = nn.Parameter(torch.zeros(1, 1, cfg.vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor, num_codes: int) -> torch.Tensor:
        h = self.ln(self.gelu(self.fc(x)))
        # Only the generative codes are ever scored, so the other vocabulary rows are skipped.
        return h @ word_embeddings[:num_codes].detach().t() + self.bias[..., :num_codes]


def projection_mlp(dim: int, hidden: int, out: int) -> nn.Sequential:
    """Sorcen's projector and predictor: Linear → BatchNorm1d → ReLU → Linear (the authors' layout)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out))


@dataclass
class Condition:
    """What a class-conditional decoder is given besides the canvas (`ModelConfig.cond_classes`, paper §4.4):
    class ids [B] (−1: the learned null class token of classifier-free guidance) and, with
    `cond_tail="centroids"`, codebook ids [B, L] whose centroids form the tail."""

    classes: torch.Tensor
    tail: torch.Tensor | None = None

    def with_null_copy(self) -> "Condition":
        """[self; the same with the null class] stacked on the batch axis (the guided and unguided halves)."""
        classes = torch.cat([self.classes, torch.full_like(self.classes, -1)])
        return Condition(classes, None if self.tail is None else torch.cat([self.tail, self.tail]))


@dataclass
class LeaseOutput:
    """One batch's losses. `contrast_loss` is the method's contrast, already weighted for Sorcen (its
    echo InfoNCE) and unweighted for LEASE (eq. 4, weighted by λ in `loss`)."""

    loss: torch.Tensor
    rec_loss: torch.Tensor
    contrast_loss: torch.Tensor
    classifier_loss: torch.Tensor | None = None
    classifier_acc: torch.Tensor | None = None
    uniformity_loss: torch.Tensor | None = None  # Sorcen only, weighted, part of `loss`

    def backward_loss(self) -> torch.Tensor:
        """What the optimizer minimises: the method's loss plus the (detached-feature) monitoring classifier's loss.

        `loss` itself stays eq. 5, so logged losses mean the same with or without the classifier.
        """
        return self.loss if self.classifier_loss is None else self.loss + self.classifier_loss


class LeaseModel(nn.Module):
    """Encoder-decoder of every method. `forward` computes the training losses for one masked batch.

    With `cfg.echo_contrast` (Sorcen) it also holds the EMA teacher (`teacher_blocks` around the
    student's token embedding and final norm, `teacher_projector`), the `projector` and the `predictor`;
    `ema_update` moves the teacher towards the student."""

    def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.loss_cfg = loss_cfg or LossConfig()
        self.attention_backend = resolve_attention_backend(cfg.attention_backend)
        d, dd = cfg.embed_dim, cfg.decoder_embed_dim

        self.token_emb = TokenEmbedding(cfg)
        self.register_buffer("pos2d", sincos_2d(d, cfg.grid_size).unsqueeze(0) if cfg.pos_embed_2d else None,
                             persistent=False)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg, self.attention_backend) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.ln_eps)

        self.decoder_embed = nn.Linear(d, dd)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.decoder_pos_rows, dd))
        self.decoder_blocks = nn.ModuleList(
            Block(dd, cfg.decoder_num_heads, cfg, self.attention_backend) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=cfg.ln_eps)
        self.mlm_layer = MlmLayer(cfg)
        self.class_proj = self.tail_proj = self.null_class = self.tail_pos_embed = None
        if cfg.cond_classes:
            self._add_condition_inputs(cfg)

        contrast = cfg.contrast_on
        if contrast != "none" and cfg.codebook_dim is None:
            raise ValueError(f"model.contrast_on={contrast!r} needs model.codebook_dim (set from the codebook)")
        self.proj_to_dino = (nn.Sequential(nn.Linear(d, cfg.codebook_dim, bias=False))
                             if contrast in ENCODER_CONTRAST else None)
        self.dec_to_dino = (nn.Linear(dd, cfg.codebook_dim, bias=False)
                            if contrast in DECODER_CONTRAST else None)
        self.online_classifier = self._classifier(cfg) if cfg.num_classes > 0 else None
        if cfg.echo_contrast:
            self.teacher_blocks = nn.ModuleList(
                Block(d, cfg.num_heads, cfg, self.attention_backend) for _ in range(cfg.depth))
            self.projector = projection_mlp(d, cfg.projector_hidden, cfg.projector_dim)
            self.teacher_projector = projection_mlp(d, cfg.projector_hidden, cfg.projector_dim)
            self.predictor = projection_mlp(cfg.projector_dim, cfg.predictor_hidden, cfg.projector_dim)
            for param in self.teacher_parameters():  # moved by ema_update only
                param.requires_grad_(False)
        if contrast != "none":
            k = 1  # real values arrive with set_codebook
            self.register_buffer("codebook_unit", torch.zeros(k, cfg.codebook_dim))
            self.register_buffer("neighbour_index", torch.zeros(k, self.loss_cfg.num_neighbours + 1,
                                                                dtype=torch.long))
            self.register_buffer("neighbour_weight", torch.zeros(k, self.loss_cfg.num_neighbours + 1))
        self._init_weights()
        if cfg.matmul_dtype == "fp8":
            float8_training(self)

    # ----------------------------------------------------------------------------------- setup
    def _add_condition_inputs(self, cfg: ModelConfig) -> None:
        """The class token's map from CLIP's width, the null class token, and the centroid tail's map
        (the class texts and centroids are buffers, installed by `set_condition`)."""
        dd = cfg.decoder_embed_dim
        self.register_buffer("class_text", torch.zeros(cfg.cond_classes, cfg.cond_text_dim))
        self.class_proj = nn.Linear(cfg.cond_text_dim, dd)
        self.null_class = nn.Parameter(torch.zeros(1, dd))
        if cfg.cond_tail == "centroids":
            if cfg.codebook_dim is None:
                raise ValueError("model.cond_tail=centroids needs model.codebook_dim (set from the codebook)")
            self.register_buffer("tail_centroids", torch.zeros(1, cfg.codebook_dim))
            self.tail_proj = nn.Linear(cfg.codebook_dim, dd)
            if cfg.cond_tail_positions == "own":
                self.tail_pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, dd))

    @torch.no_grad()
    def set_condition(self, class_text: torch.Tensor, centroids: torch.Tensor | None = None) -> None:
        """Install the class texts' CLIP features [cond_classes, cond_text_dim] and, for the tail, the
        codebook's centroids [K, codebook_dim] (row-normalised: the codebook's geometry is cosine)."""
        cfg = self.cfg
        if tuple(class_text.shape) != (cfg.cond_classes, cfg.cond_text_dim):
            raise ValueError(f"class embeddings have shape {tuple(class_text.shape)}, the model expects "
                             f"[{cfg.cond_classes}, {cfg.cond_text_dim}] (model.cond_classes, model.cond_text_dim)")
        device = self.decoder_pos_embed_learned.device
        self.class_text = class_text.float().to(device)
        if self.tail_proj is not None:
            if centroids is None or centroids.ndim != 2 or centroids.shape[1] != cfg.codebook_dim:
                raise ValueError(f"the centroid tail needs the codebook [K, {cfg.codebook_dim}]")
            self.tail_centroids = F.normalize(centroids.float(), dim=-1).to(device)

    @staticmethod
    def _classifier(cfg: ModelConfig) -> nn.Module:
        if cfg.classifier_hidden == 0:
            return nn.Linear(cfg.embed_dim, cfg.num_classes)
        return nn.Sequential(nn.Linear(cfg.embed_dim, cfg.classifier_hidden), nn.ReLU(),
                             nn.Linear(cfg.classifier_hidden, cfg.num_classes))

    def _init_weights(self) -> None:
        """As the authors (MAE/MAGE): xavier-uniform linears, unit LayerNorms, N(0, .02) embeddings.

        (The reference fixture's random-weight reconstruction loss, ≈ ln V_gen, shows the small init.)
        """
        for table in (self.decoder_pos_embed_learned, self.token_emb.word_embeddings.weight,
                      self.token_emb.position_embeddings.weight, self.null_class, self.tail_pos_embed):
            if table is not None:
                nn.init.normal_(table, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.no_grad()
    def set_codebook(self, centroids: torch.Tensor) -> NeighbourTable:
        """Install the discriminative codebook: row-normalised centroids and the fixed neighbour table."""
        if self.cfg.contrast_on == "none":
            return neighbour_table(centroids, self.loss_cfg.num_neighbours)
        if centroids.ndim != 2 or centroids.shape[1] != self.cfg.codebook_dim:
            raise ValueError(f"codebook has shape {tuple(centroids.shape)} but the model expects "
                             f"[K, {self.cfg.codebook_dim}] (model.codebook_dim)")
        table = neighbour_table(centroids.float(), self.loss_cfg.num_neighbours)
        device = self.decoder_pos_embed_learned.device
        self.codebook_unit = F.normalize(centroids.float(), dim=-1).to(device)
        self.neighbour_index = table.index.to(device)
        self.neighbour_weight = table.weights(self.loss_cfg.neighbour_tau).to(device)
        return table

    @property
    def decodes_masked_only(self) -> bool:
        """Whether training decodes only the masked positions: no loss reads the others' decoder output
        (the decoder contrast reads every position, Sorcen's echo every position of its square)."""
        return self.cfg.decode_masked_only and self.dec_to_dino is None and not self.cfg.echo_contrast

    @property
    def reads_labels(self) -> bool:
        """Whether training needs the batch's labels: the class-conditional decoder's class token."""
        return self.cfg.cond_classes > 0

    @property
    def codebook_size(self) -> int:
        return self.codebook_unit.shape[0] if self.cfg.contrast_on != "none" else 0

    # --------------------------------------------------------------------------------- encoder
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embed [CLS] + patch ids at `positions` (0 = [CLS], 1..L = grid), adding the fixed sin-cos table
        (`cfg.pos_embed_2d`)."""
        x = self.token_emb(ids, positions)
        if self.pos2d is None:
            return x
        pos2d = torch.cat([torch.zeros_like(self.pos2d[:, :1]), self.pos2d], dim=1)
        return x + pos2d[0, positions]

    def encode(self, x: torch.Tensor, blocks: nn.ModuleList | None = None) -> torch.Tensor:
        """`blocks` (default: the student's) then the final norm."""
        blocks = self.blocks if blocks is None else blocks
        if self.fuses_kernels(x):
            pending = None
            for block in blocks:
                x, pending = block.forward_fused(x, pending)
            return self._final_norm(x, pending, self.norm)
        for block in blocks:
            x = block(x)
        return self.norm(x)

    def fuses_kernels(self, x: torch.Tensor) -> bool:
        """Whether the blocks run `Block.forward_fused`: `model.fused_kernels=on`, training, on CUDA."""
        return self.cfg.fused_kernels == "on" and self.training and fused_norm_available(x)

    def _final_norm(self, x: torch.Tensor, pending: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """norm(x + dropout(pending)) in one kernel, after the last fused block."""
        return dropout_add_layer_norm(x, pending, norm, self.cfg.dropout, self.cfg.residual_dtype == "autocast")[1]

    def with_cls(self, ids: torch.Tensor) -> torch.Tensor:
        cls = torch.full_like(ids[:, :1], self.cfg.cls_token_id)
        return torch.cat([cls, ids], dim=1)

    def forward_encoder(self, tokens: torch.Tensor, plan: MaskPlan) -> torch.Tensor:
        """Encoder on [CLS] + kept tokens (masked kept ones carry [MASK]) → [B, 1 + L_keep, D]."""
        ids = tokens.gather(1, plan.keep_idx)
        ids = torch.where(plan.keep_masked, torch.full_like(ids, self.cfg.mask_token_id), ids)
        positions = self.with_cls(plan.keep_idx + 1)
        positions[:, 0] = 0
        return self.encode(self.embed(self.with_cls(ids), positions))

    def forward_encoder_full(self, tokens: torch.Tensor, masked: torch.Tensor | None = None,
                             blocks: nn.ModuleList | None = None) -> torch.Tensor:
        """Encoder on [CLS] + all L tokens (masked ones → [MASK]) → [B, 1 + L, D]; `blocks` as `encode`."""
        if masked is not None:
            tokens = torch.where(masked, torch.full_like(tokens, self.cfg.mask_token_id), tokens)
        positions = torch.arange(tokens.shape[1] + 1, device=tokens.device).expand(tokens.shape[0], -1)
        return self.encode(self.embed(self.with_cls(tokens), positions), blocks)

    # --------------------------------------------------------------------------------- decoder
    def forward_decoder(self, latent: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor,
                        out_positions: torch.Tensor | None = None, condition: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """Decoder hidden states [B, 1 + L, Dd] from the canvas (paper §3.1, reconstruction step).

        `latent` [B, 1 + n, D] are encoder outputs with [CLS] first, `slots` [B, n] their grid positions
        and `visible` [B, n] whether each is unmasked. Every canvas slot starts as the [CLS] latent; the
        visible slots add their own latent to it (`decoder_canvas="cls_plus_latent"`, the authors' LEASE)
        or hold it alone (`"latent"`, their MAGE and Sorcen); both checked against the fixtures' logits.

        With `out_positions` [B, M] (grid positions) only those rows come out, [B, M, Dd]: the last
        block then computes queries, MLP and norm for them alone, which gives the same numbers.
        `condition` [B, n_c, Dd] (`condition_rows`) is concatenated after the canvas (the supplement's
        "concatenated to the main reconstruction canvas"); its rows are attended to, never returned.
        """
        x = self.decoder_embed(latent)
        b, _, dd = x.shape
        cls = x[:, :1]
        own = x[:, 1:] + cls if self.cfg.decoder_canvas == "cls_plus_latent" else x[:, 1:]
        fill = torch.where(visible.unsqueeze(-1), own, cls)
        canvas = cls.expand(b, self.cfg.seq_len + 1, dd).clone()
        canvas.scatter_(1, (slots + 1).unsqueeze(-1).expand(-1, -1, dd), fill)
        x = canvas + self.decoder_pos_embed_learned[:, : self.cfg.seq_len + 1]
        if condition is not None:
            x = torch.cat([x, condition.to(x.dtype)], dim=1)
        query_rows = None if out_positions is None else out_positions + 1
        canvas_only = out_positions is None and condition is not None  # the condition rows are not returned
        if self.fuses_kernels(x):
            pending = None
            for block in self.decoder_blocks[:-1]:
                x, pending = block.forward_fused(x, pending)
            x, pending = self.decoder_blocks[-1].forward_fused(x, pending, query_rows)
            if canvas_only:
                x, pending = x[:, : self.cfg.seq_len + 1], pending[:, : self.cfg.seq_len + 1]
            return self._final_norm(x, pending, self.decoder_norm)
        for block in self.decoder_blocks[:-1]:
            x = block(x)
        last = self.decoder_blocks[-1](x, query_rows)
        if canvas_only:
            last = last[:, : self.cfg.seq_len + 1]
        return self.decoder_norm(last)

    def condition_rows(self, condition: Condition) -> torch.Tensor:
        """The decoder's extra input rows [B, 1 (+ L), Dd]: the class token (W·CLIP(class) + b, or the null
        token for class −1), then the tail W'·ĉ_i + p_i of each patch's unit centroid ĉ_i."""
        token = self.class_proj(self.class_text[condition.classes.clamp_min(0)])
        token = torch.where((condition.classes < 0).unsqueeze(-1), self.null_class.to(token.dtype), token)
        if self.tail_proj is None:
            return token.unsqueeze(1)
        if condition.tail is None:
            raise ValueError("model.cond_tail=centroids needs the codebook ids of the tail (Condition.tail)")
        positions = (self.tail_pos_embed if self.tail_pos_embed is not None
                     else self.decoder_pos_embed_learned[:, 1 : self.cfg.seq_len + 1])
        tail = self.tail_proj(self.tail_centroids[condition.tail.long()])
        return torch.cat([token.unsqueeze(1), tail + positions.to(tail.dtype)], dim=1)

    def training_condition(self, labels: torch.Tensor | None, disc: torch.Tensor | None) -> Condition:
        """The batch's own classes (each replaced by the null class with probability cond_null_prob, from
        the dropout stream) and its own codebook ids as the tail."""
        if labels is None:
            raise ValueError("a class-conditional decoder (model.cond_classes) trains on the batch's labels")
        drop = torch.rand(labels.shape, device=labels.device) < self.cfg.cond_null_prob
        return Condition(torch.where(drop, -1, labels.long()), disc if self.tail_proj is not None else None)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlm_layer(hidden, self.token_emb.word_embeddings.weight, self.cfg.vocab_gen)

    # ------------------------------------------------------------------------------- training
    def forward(self, tokens: torch.Tensor, disc: torch.Tensor | None, plan: MaskPlan,
                labels: torch.Tensor | None = None) -> LeaseOutput:
        """The method's losses for a batch of generative `tokens` [B, L] and codebook ids `disc` [B, L]
        (LEASE: eq. 5; MAGE: eq. 1; Sorcen: eq. 1 + echo losses, `plan.echo` holding its draws)."""
        latent = self.forward_encoder(tokens, plan)
        visible = ~plan.keep_masked
        cond = self.condition_rows(self.training_condition(labels, disc)) if self.cfg.cond_classes else None
        if self.decodes_masked_only:
            rows = plan.decode_idx
            hidden = self.forward_decoder(latent, plan.keep_idx, visible, rows, cond)
            rec = reconstruction_loss(self.mlm_logits(hidden), tokens.gather(1, rows), plan.masked.gather(1, rows),
                                      self.loss_cfg.label_smoothing)
        else:
            hidden = self.forward_decoder(latent, plan.keep_idx, visible, condition=cond)
            logits = self.mlm_logits(hidden[:, 1:])
            rec = reconstruction_loss(logits, tokens, plan.masked, self.loss_cfg.label_smoothing)
        if self.cfg.echo_contrast:
            if plan.echo is None:
                raise ValueError("model.echo_contrast needs the echo's random choices in plan.echo")
            uniformity, contrast = self.echo_losses(latent, logits, tokens, plan.echo)
            out = LeaseOutput(loss=rec + uniformity + contrast, rec_loss=rec, contrast_loss=contrast,
                              uniformity_loss=uniformity)
            pooled = latent.mean(dim=1)  # the authors' Sorcen classifier reads [CLS] too
        else:
            contrast = self.contrast_loss(latent, hidden, disc, plan)
            out = LeaseOutput(loss=rec + self.loss_cfg.contrast_weight * contrast, rec_loss=rec,
                              contrast_loss=contrast)
            pooled = latent[:, 1:].mean(dim=1)
        if self.online_classifier is not None and labels is not None:
            out.classifier_loss, out.classifier_acc = self.classifier_loss(pooled, labels)
        return out

    def contrast_loss(self, latent: torch.Tensor, hidden: torch.Tensor, disc: torch.Tensor | None,
                      plan: MaskPlan) -> torch.Tensor:
        """Codebook contrast (eq. 4) on encoder (EC) and/or decoder (DC) features, per `contrast_on`: the
        mean of both for "both"; for the authors' placements the DC is a hard cross-entropy to each masked
        token's own centroid (eq. 4 with the centroid as the one positive), summed with the EC."""
        placement = self.cfg.contrast_on
        if placement == "none":
            return latent.new_zeros(())
        if disc is None:
            raise ValueError(f"model.contrast_on={placement!r} needs the codebook ids (disc tokens)")
        terms = []
        if self.proj_to_dino is not None:  # EC: kept unmasked encoder tokens (plus the plan's padding rows)
            rows = plan.contrast_idx
            ids = disc.gather(1, plan.keep_idx.gather(1, rows))
            features = self.proj_to_dino(gather_rows(latent[:, 1:], rows))
            terms.append(self._contrast(features, ids, ~plan.keep_masked.gather(1, rows)))
        if placement in ("decoder", "both"):  # DC: decoder outputs at every grid position
            terms.append(self._contrast(self.dec_to_dino(hidden[:, 1:]), disc, None))
        if placement in ("decoder_authors", "both_authors"):
            own = disc.long().unsqueeze(-1)
            terms.append(codebook_contrast_loss(self.dec_to_dino(hidden[:, 1:]), self.codebook_unit, own,
                                                torch.ones_like(own, dtype=torch.float32),
                                                self.loss_cfg.contrast_tau, plan.masked))
            return sum(terms)
        return sum(terms) / len(terms) if len(terms) > 1 else terms[0]

    def _contrast(self, features: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        ids = ids.long()
        return codebook_contrast_loss(features, self.codebook_unit, self.neighbour_index[ids],
                                      self.neighbour_weight[ids], self.loss_cfg.contrast_tau, weight)

    def classifier_loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Online classifier on detached pooled encoder features [B, D]: monitoring only."""
        logits = self.online_classifier(pooled.detach().float())
        return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()

    # ------------------------------------------------------------------------- Sorcen's echo
    def echo_losses(self, latent: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor,
                    echo: EchoPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorcen's two terms beside eq. 1, weighted: (uniformity, echo InfoNCE).

        Uniformity: w_u · mean((ẑ ẑᵀ)²), ẑ the L2-normalised mean of all encoder rows ([CLS] included).
        InfoNCE: λ · CE(cos(teacher(echo)_i, predictor(projector(mean of the patch rows))_j) / τ).
        """
        cfg = self.loss_cfg
        uniformity = cfg.uniformity_weight * uniformity_loss(F.normalize(latent.mean(dim=1).float(), dim=-1))
        teacher = self.forward_teacher(self.echo_tokens(logits, tokens, echo))
        student = self.predictor(self.projector(latent[:, 1:].mean(dim=1)))
        return uniformity, cfg.echo_weight * info_nce_loss(teacher, student, cfg.echo_tau)

    @torch.no_grad()
    def echo_tokens(self, logits: torch.Tensor, tokens: torch.Tensor, echo: EchoPlan) -> torch.Tensor:
        """The echo [B, L]: inside each image's square a draw from the top-k code logits without their
        maximum (`lease.sorcen.echo_support`; the true tokens while `echo.from_truth`), [MASK] outside."""
        if echo.from_truth:
            source = tokens.long()
        else:
            source = sample_support(*echo_support(logits.float(), self.loss_cfg.echo_top_k), echo.noise)
        inside = square_mask(self.cfg.grid_size, echo.side, echo.top, echo.left)
        return torch.where(inside, source, self.cfg.mask_token_id)

    @torch.no_grad()
    def forward_teacher(self, echo_ids: torch.Tensor) -> torch.Tensor:
        """The momentum projection [B, P] of the teacher's blocks on [CLS] + echo, inside the student's
        token embedding and final norm (as the authors), pooled over the L patch rows."""
        latent = self.forward_encoder_full(echo_ids, blocks=self.teacher_blocks)
        return self.teacher_projector(latent[:, 1:].mean(dim=1))

    def teacher_parameters(self) -> list[nn.Parameter]:
        """The teacher's parameters, in the order of `ema_student_parameters` (BatchNorm statistics are
        buffers: the teacher keeps its own)."""
        return [*self.teacher_blocks.parameters(), *self.teacher_projector.parameters()]

    def ema_student_parameters(self) -> list[nn.Parameter]:
        return [*self.blocks.parameters(), *self.projector.parameters()]

    @torch.no_grad()
    def ema_update(self, beta: float) -> None:
        """teacher ← β · teacher + (1 − β) · student, one fused op over every teacher tensor."""
        torch._foreach_lerp_(self.teacher_parameters(), self.ema_student_parameters(), 1.0 - beta)

    # ------------------------------------------------------------------------------ inference
    def features(self, tokens: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Encoder features of the full, unmasked sequence: mean of patch outputs, or [CLS]."""
        x = self.forward_encoder_full(tokens)
        if pool == "mean":
            return x[:, 1:].mean(dim=1)
        if pool == "cls":
            return x[:, 0]
        raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")

    def code_logits(self, tokens: torch.Tensor, masked: torch.Tensor, condition: Condition | None = None
                    ) -> torch.Tensor:
        """Code logits [B, L, V_gen] with `masked` positions hidden (MaskGIT decoding, inpainting); a
        class-conditional decoder takes its `condition` (class ids, tail)."""
        latent = self.forward_encoder_full(tokens, masked)
        slots = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        if self.cfg.cond_classes and condition is None:
            raise ValueError("this decoder is class-conditional: give a Condition (class ids; -1 = none)")
        rows = self.condition_rows(condition) if condition is not None else None
        hidden = self.forward_decoder(latent, slots, ~masked, condition=rows)
        return self.mlm_logits(hidden[:, 1:])

    def check_tokens(self, tokens: torch.Tensor, disc: torch.Tensor | None = None) -> None:
        """Fail with a clear message on ids out of range (called on the first batch, not per step)."""
        if tokens.shape[1] != self.cfg.seq_len:
            raise ValueError(f"token sequences have length {tokens.shape[1]}, model expects {self.cfg.seq_len}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.cfg.vocab_gen:
            raise ValueError(f"generative token ids span [{lo}, {hi}] but the model has vocab_gen="
                             f"{self.cfg.vocab_gen} codes: wrong tokenizer or model.vocab_gen")
        if disc is not None and self.cfg.contrast_on != "none":
            lo, hi = int(disc.min()), int(disc.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"codebook ids span [{lo}, {hi}] but the codebook has K={self.codebook_size} "
                                 "centroids: were the shards packed with another codebook?")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(cfg: ModelConfig, kept: int, codebook_size: int) -> float:
    """Training FLOPs per image of the matmuls the method needs: encoder blocks on 1 + kept tokens,
    decoder embedding, decoder blocks on 1 + L, attention scores and mixing, MLM head and logits, the
    contrast projection and logits; for Sorcen's echo (`echo_contrast`) the teacher's blocks on 1 + L
    tokens and its momentum projector (forward only), the projector and the predictor on the pooled row.

    A matmul against a trained weight costs 3× its forward (forward, input gradient, weight gradient);
    the MLM logits against the detached token embeddings and the contrast logits against the fixed
    codebook cost 2× (no weight gradient), the teacher's matmuls 1× (no gradient at all). The B × B
    logits of Sorcen's InfoNCE and uniformity term grow with the batch and are left out (under 0.1 %
    of the step at ViT-B, batch 256). Counted at every decoder position and, for the encoder
    contrast, every kept token, as the authors' code computes, so work that `decode_masked_only` and
    `MaskPlan.contrast_idx` skip shows up as a higher MFU rather than fewer FLOPs.
    `tests/test_bench.py` checks this against torch's FLOP counter on an eager step.
    """
    trained, frozen, forward_only = 3.0, 2.0, 1.0

    def blocks(n_tok: int, dim: int, depth: int, factor: float = trained) -> float:
        dense = 2 * n_tok * (4 * dim * dim + 2 * dim * int(dim * cfg.mlp_ratio))
        attn = 2 * 2 * n_tok * n_tok * dim  # q·kᵀ and p·v
        return factor * depth * (dense + attn)

    def mlp(width: int, hidden: int, out: int, factor: float) -> float:  # projector / predictor, one row
        return factor * 2 * (width * hidden + hidden * out)

    d, dd, seq = cfg.embed_dim, cfg.decoder_embed_dim, cfg.seq_len
    total = blocks(kept + 1, d, cfg.depth) + blocks(seq + 1, dd, cfg.decoder_depth)
    total += trained * 2 * (kept + 1) * d * dd  # decoder_embed
    total += trained * 2 * seq * dd * d + frozen * 2 * seq * d * cfg.vocab_gen  # MLM head, logits
    if cfg.codebook_dim:
        contrast_rows = {"encoder": [(kept, d)], "decoder": [(seq, dd)], "both": [(kept, d), (seq, dd)],
                         "decoder_authors": [(seq, dd)], "both_authors": [(kept, d), (seq, dd)],
                         "none": []}[cfg.contrast_on]
        for rows, width in contrast_rows:  # projection to the codebook dim, logits over the K centroids
            total += 2 * rows * cfg.codebook_dim * (trained * width + frozen * codebook_size)
    if cfg.echo_contrast:
        total += blocks(seq + 1, d, cfg.depth, forward_only)  # the teacher on [CLS] + echo
        total += mlp(d, cfg.projector_hidden, cfg.projector_dim, forward_only + trained)  # momentum + own projector
        total += mlp(cfg.projector_dim, cfg.predictor_hidden, cfg.projector_dim, trained)
    return total


def describe(model: LeaseModel) -> str:
    cfg = model.cfg
    name = "Sorcen" if cfg.echo_contrast else "LEASE" if cfg.contrast_on != "none" else "MAGE-style"
    if cfg.cond_classes:
        name = f"class-conditional decoder ({cfg.cond_classes} classes, tail {cfg.cond_tail})"
    return (f"{name} d={cfg.embed_dim} depth={cfg.depth} heads={cfg.num_heads} | decoder d={cfg.decoder_embed_dim} "
            f"depth={cfg.decoder_depth} heads={cfg.decoder_num_heads} | V_gen={cfg.vocab_gen} "
            f"vocab={cfg.vocab_size} | contrast={cfg.contrast_on} | attention={model.attention_backend} | "
            f"{count_parameters(model) / 1e6:.1f}M params")

