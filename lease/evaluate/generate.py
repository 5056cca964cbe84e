"""MaskGIT iterative decoding with a LEASE model, then VQGAN decoding to images (paper §4, MAGE's protocol).

Unconditional generation starts from an all-[MASK] canvas; reconstruction, inpainting and outpainting
start from real tokens with some positions given (`fixed`). Each of the T steps:

1. logits = model.code_logits(tokens, masked) over the V_gen codes;
2. every masked position samples a code from softmax(logits) (Gumbel-max: exact categorical sampling);
3. confidence = log p(sampled) + τ_t · Gumbel noise, with τ_t = 4.5 · (1 − (t+1)/T) (annealed);
   positions not masked get +∞, so given tokens and tokens committed earlier are never re-masked;
4. the n_t lowest-confidence masked positions are masked again, n_t = ⌊N₀ · cos(π/2 · (t+1)/T)⌋
   (N₀: masked positions at the start), clamped to [1, still-masked − 1] as in MaskGIT / MAGE.

Two presets (`GenerateConfig.preset`):

- `mage`: what the authors' FID numbers came from (MAGE's script): T = 20, τ = 6.0, fp32. The last step
  re-masks like every other (the clamp keeps one position masked); one extra forward pass then fills what
  is still masked with the arg-max code (`greedy_fill`). Images reach uint8 by truncation, as their PNGs.
- `maskgit`: T = 12, τ = 4.5, the last step commits every sampled code; images are rounded to uint8.

Any field set explicitly overrides its preset value (bf16 is a switch on either).

A class-conditional decoder (`lease.condgen`) samples with its conditioning fixed for the whole decode
(a `lease.model.Condition`: class ids and the centroid tail); with `guidance` w > 0 each step's logits
are (1 + w)·ℓ(class) − w·ℓ(null class), classifier-free guidance, from one doubled batch. All of it is batched tensor code with no
per-sample Python and no host synchronisation; the random numbers come from an explicit generator and
are passed into `maskgit_step`, which traces into one graph under `torch.compile`.
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from tqdm import tqdm

from lease.evaluate.features import as_ids, autocast_for, eval_mode, resolve_device
from lease.images import Uint8Mode
from lease.typed_config import require

log = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


GENERATE_PRESETS: dict[str, dict[str, object]] = {
    "mage": {"num_steps": 20, "choice_temperature": 6.0, "greedy_fill": True, "dtype": "fp32", "uint8": "truncate"},
    "maskgit": {"num_steps": 12, "choice_temperature": 4.5, "greedy_fill": False, "dtype": "auto", "uint8": "round"},
}


@dataclass
class GenerateConfig:
    preset: Literal["mage", "maskgit"] = "mage"
    # None: the preset's value (GENERATE_PRESETS); filled in by __post_init__, so records show what ran
    num_steps: int | None = None
    choice_temperature: float | None = None
    greedy_fill: bool | None = None  # an extra arg-max pass for the positions the last step left masked
    dtype: Literal["auto", "bf16", "fp16", "fp32"] | None = None
    uint8: Uint8Mode | None = None  # how [0, 1] images become uint8 for FID / IS
    batch_size: int = 256
    num_images: int = 50000
    seed: int = 0
    compile: bool = False
    guidance: float = 0.0  # classifier-free guidance weight w of a class-conditional decoder (0: none)

    def __post_init__(self) -> None:
        require(self.preset in GENERATE_PRESETS, "preset", f"must be one of {list(GENERATE_PRESETS)}")
        for key, value in GENERATE_PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        require(self.num_steps > 0, "num_steps", "must be > 0")
        require(self.choice_temperature >= 0, "choice_temperature", "must be >= 0")
        require(self.uint8 in ("round", "truncate"), "uint8", "must be round or truncate")
        require(self.batch_size > 0, "batch_size", "must be > 0")
        require(self.num_images > 0, "num_images", "must be > 0")
        require(self.guidance >= 0, "guidance", "must be >= 0")


def mask_schedule(num_steps: int, choice_temperature: float, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step t: the fraction of the initial masks kept masked, cos(π/2·(t+1)/T), and the choice
    temperature τ·(1 − (t+1)/T). Returned as tensors so compiled steps see data, not new constants."""
    progress = torch.arange(1, num_steps + 1, dtype=torch.float64) / num_steps
    ratio = torch.cos(math.pi / 2 * progress)
    temperature = choice_temperature * (1.0 - progress)
    return ratio.float().to(device), temperature.float().to(device)


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard Gumbel samples −log E, E ~ Exp(1)."""
    e = torch.empty(shape, device=device).exponential_(generator=generator)
    return -e.clamp_min_(torch.finfo(torch.float32).tiny).log_()


def maskgit_step(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, initial_masked: torch.Tensor,
                 mask_ratio: torch.Tensor, temperature: torch.Tensor, sample_noise: torch.Tensor,
                 choice_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step → (tokens with every masked position sampled, positions to mask again).

    logits [B, L, V]; tokens int64 [B, L]; masked bool [B, L]; initial_masked int64 [B, 1];
    mask_ratio, temperature: 0-d; sample_noise [B, L, V] and choice_noise [B, L]: Gumbel samples.
    """
    log_probs = logits.float().log_softmax(dim=-1)
    sampled = torch.where(masked, (log_probs + sample_noise).argmax(dim=-1), tokens)
    confidence = log_probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1) + temperature * choice_noise
    confidence = confidence.masked_fill(~masked, float("inf"))
    still = masked.sum(dim=1, keepdim=True)
    target = torch.floor(initial_masked * mask_ratio).long()
    mask_len = torch.minimum(still - 1, target).clamp_min(1)
    cutoff = confidence.sort(dim=1).values.gather(1, mask_len - 1)
    # `& masked`: a row with nothing left to decode must not re-mask its (+inf) given tokens
    return sampled, (confidence <= cutoff) & masked


def greedy_fill(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """`tokens` with every `masked` position set to its arg-max code (the `mage` preset's extra pass)."""
    return torch.where(masked, logits.argmax(dim=-1), tokens)


def maskgit_decode(logits_fn: LogitsFn, tokens: torch.Tensor, fixed: torch.Tensor, num_steps: int,
                   choice_temperature: float, generator: torch.Generator,
                   step_fn: Callable = maskgit_step, history: list[torch.Tensor] | None = None,
                   greedy_last: bool = False) -> torch.Tensor:
    """Fill every non-`fixed` position of `tokens` [B, L] by MaskGIT decoding; fixed ones are returned as given.

    `greedy_last`: the last step re-masks by the schedule too, then one more pass fills the rest by arg-max
    (MAGE's protocol); otherwise the last step commits every sample. `history`, when a list, receives the
    per-row count of masked positions after each step (and after the greedy pass).
    """
    if tokens.shape != fixed.shape or fixed.dtype != torch.bool:
        raise ValueError(f"tokens {tuple(tokens.shape)} and fixed {tuple(fixed.shape)} must match; fixed is bool")
    device = tokens.device
    masked = ~fixed
    tokens = tokens.masked_fill(masked, 0)
    initial = masked.sum(dim=1, keepdim=True)
    ratios, temperatures = mask_schedule(num_steps, choice_temperature, device)
    for t in range(num_steps):
        logits = logits_fn(tokens, masked)
        sample_noise = gumbel_noise(tuple(logits.shape), generator, device)
        choice_noise = gumbel_noise(tuple(masked.shape), generator, device)
        tokens, remask = step_fn(logits, tokens, masked, initial, ratios[t], temperatures[t], sample_noise,
                                 choice_noise)
        masked = remask if greedy_last or t < num_steps - 1 else torch.zeros_like(masked)
        if history is not None:
            history.append(masked.sum(dim=1))
    if greedy_last:
        tokens = greedy_fill(logits_fn(tokens, masked), tokens, masked)
        if history is not None:
            history.append(torch.zeros_like(history[-1]))
    return tokens


# --------------------------------------------------------------------------------- given-token masks
def random_mask(batch: int, seq_len: int, ratio: float, generator: torch.Generator,
                device: torch.device) -> torch.Tensor:
    """bool [B, L]: exactly ⌈L·ratio⌉ random positions per row are True (to be regenerated)."""
    count = math.ceil(seq_len * ratio)
    scores = torch.rand(batch, seq_len, generator=generator, device=device)
    return scores.argsort(dim=1).argsort(dim=1) < count


def box_mask(batch: int, grid_size: int, fraction: float, device: torch.device) -> torch.Tensor:
    """bool [B, L]: True inside the centred square box covering `fraction` of the grid side."""
    side = max(1, round(grid_size * fraction))
    lo = (grid_size - side) // 2
    inside = torch.zeros(grid_size, grid_size, dtype=torch.bool, device=device)
    inside[lo : lo + side, lo : lo + side] = True
    return inside.flatten().expand(batch, -1).clone()


def task_mask(task: str, batch: int, grid_size: int, generator: torch.Generator, device: torch.device,
              ratio: float = 0.5, box: float = 0.5) -> torch.Tensor:
    """Positions to regenerate for `reconstruction` (random `ratio`), `inpainting` (the centre box)
    or `outpainting` (everything but the centre box)."""
    if task == "reconstruction":
        return random_mask(batch, grid_size * grid_size, ratio, generator, device)
    if task == "inpainting":
        return box_mask(batch, grid_size, box, device)
    if task == "outpainting":
        return ~box_mask(batch, grid_size, box, device)
    raise ValueError(f"task must be reconstruction, inpainting or outpainting; got {task!r}")


# ------------------------------------------------------------------------------------------ sampler
class MaskGitSampler:
    """Batched MaskGIT decoding with a LEASE model (eval mode, autocast, optional torch.compile)."""

    def __init__(self, model: torch.nn.Module, cfg: GenerateConfig, device: str | torch.device | None = None):
        self.model, self.cfg = model, cfg
        self.device = resolve_device(device)
        self.seq_len, self.grid_size = model.cfg.seq_len, model.cfg.grid_size
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        logits_fn, self.step_fn = model.code_logits, maskgit_step
        if cfg.compile:
            # fixed shapes (full batches only, see `generate`) → one graph for the model and one for the step
            logits_fn = torch.compile(model.code_logits, dynamic=False)
            self.step_fn = torch.compile(maskgit_step, dynamic=False)
        self._logits_fn = logits_fn

    def logits(self, tokens: torch.Tensor, masked: torch.Tensor, condition=None) -> torch.Tensor:
        """Code logits; with a `condition` (class-conditional decoder) guided by `cfg.guidance`."""
        with autocast_for(self.device, self.cfg.dtype):
            if condition is None:
                return self._logits_fn(tokens, masked)
            if self.cfg.guidance == 0:
                return self._logits_fn(tokens, masked, condition)
            both = self._logits_fn(tokens.repeat(2, 1), masked.repeat(2, 1), condition.with_null_copy())
            guided, unguided = both.float().chunk(2)
            return guided + self.cfg.guidance * (guided - unguided)

    @torch.inference_mode()
    def complete(self, tokens: torch.Tensor, regenerate: torch.Tensor,
                 history: list[torch.Tensor] | None = None, condition=None) -> torch.Tensor:
        """Regenerate the `regenerate` positions of real `tokens` [B, L]; the others are kept exactly.
        `condition` (a `lease.model.Condition`) is given unchanged to every step."""
        tokens = as_ids(tokens.to(self.device))
        logits_fn = self.logits if condition is None else functools.partial(self.logits, condition=condition)
        with eval_mode(self.model):
            return maskgit_decode(logits_fn, tokens, ~regenerate.to(self.device), self.cfg.num_steps,
                                  self.cfg.choice_temperature, self.generator, self.step_fn, history,
                                  greedy_last=self.cfg.greedy_fill)

    def sample(self, batch: int, condition=None) -> torch.Tensor:
        """Samples int64 [batch, L] from an all-[MASK] canvas (unconditional, or under `condition`)."""
        empty = torch.zeros(batch, self.seq_len, dtype=torch.long, device=self.device)
        return self.complete(empty, torch.ones_like(empty, dtype=torch.bool), condition=condition)

    def generate(self, num_images: int | None = None) -> torch.Tensor:
        """`num_images` unconditional token grids, uint16 [N, L] on the CPU (always full batches)."""
        num_images = num_images or self.cfg.num_images
        out = torch.empty(num_images, self.seq_len, dtype=torch.uint16)
        with tqdm(total=num_images, unit="img", desc="MaskGIT", leave=False, disable=None) as bar:
            for lo in range(0, num_images, self.cfg.batch_size):
                batch = self.sample(self.cfg.batch_size)[: num_images - lo]
                out[lo : lo + batch.shape[0]] = batch.to(torch.int32).cpu().to(torch.uint16)
                bar.update(batch.shape[0])
        return out


def decode_images(vqgan, tokens: torch.Tensor, grid_size: int, dtype: str = "auto") -> torch.Tensor:
    """VQGAN decoding of code grids: tokens [B, L] → float images [B, 3, H, W] in [0, 1]."""
    codes = as_ids(tokens).view(tokens.shape[0], grid_size, grid_size)
    with torch.inference_mode(), autocast_for(codes.device, dtype):
        return vqgan.decode(codes).float().clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------- CLI
def load_vqgan_from_args(args: argparse.Namespace, device: torch.device, **options):
    from lease.tokenizers import load_vqgan

    return load_vqgan(args.vqgan_kind, args.vqgan_checkpoint, config=args.vqgan_config, device=device, **options)


def check_compatible(model: torch.nn.Module, vqgan) -> None:
    """The model's codes and grid must be the tokenizer's (else decoding fails or shows noise)."""
    if model.cfg.vocab_gen > vqgan.num_codes or model.cfg.grid_size != vqgan.grid_size:
        raise ValueError(f"the model predicts {model.cfg.vocab_gen} codes on a {model.cfg.grid_size}² grid but the "
                         f"VQGAN has {vqgan.num_codes} codes on a {vqgan.grid_size}² grid: wrong tokenizer checkpoint")


def add_vqgan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vqgan-kind", choices=["maskgit", "taming"], default="maskgit")
    parser.add_argument("--vqgan-checkpoint", type=Path, required=True, help="generative tokenizer weights")
    parser.add_argument("--vqgan-config", type=Path, default=None, help="YAML config (taming checkpoints)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lease.evaluate import add_config_arguments, add_device_argument

    parser.add_argument("--checkpoint", type=Path, required=True, help="a lease training checkpoint")
    add_vqgan_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--num-images", type=int, default=None, help="default: config num_images (50000)")
    parser.add_argument("--val-shards", default=None,
                        help="packed validation split: also write reconstruction/inpainting/outpainting grids")
    parser.add_argument("--grid-images", type=int, default=8, help="rows in each image grid")
    parser.add_argument("--reference", type=Path, default=None,
                        help="validation image folder: also compute FID / IS of the samples against it")
    parser.add_argument("--inception-weights", type=Path, default=None,
                        help="torch-fidelity inception-v3-compat weights file (needed with --reference)")
    parser.add_argument("--class", dest="class_ids", type=int, action="append", default=[], metavar="ID",
                        help="class-conditional decoder (lease train-condgen): samples and a grid class-ID.png of "
                             "class ID instead of unconditional ones (repeatable; guidance: --set guidance=W)")
    parser.add_argument("--train-shards", default=None,
                        help="packed train split whose codebook ids give the centroid tails (--class, tail=centroids)")
    parser.add_argument("--sample-tail", default="exemplar", choices=["exemplar", "class_mode"],
                        help="tail of a sample: a random training image's ids, or each position's most frequent id")
    add_device_argument(parser)
    add_config_arguments(parser)


def _class_samples(args: argparse.Namespace, sampler: MaskGitSampler, vqgan, record: dict) -> torch.Tensor:
    """`--class` samples: per class its tokens (class-ID_tokens.npy) and a grid (class-ID.png)."""
    from lease.condgen import generate_class
    from lease.data import read_token_set
    from lease.evaluate.grids import save_image_grid
    from lease.io import atomic_path

    model = sampler.model
    if not model.cfg.cond_classes:
        raise SystemExit(f"--class needs a class-conditional checkpoint (lease train-condgen); {args.checkpoint} "
                         "is unconditional")
    if model.tail_proj is not None and not args.train_shards:
        raise SystemExit("this decoder reads a centroid tail: give --train-shards (the packed train split)")
    tokens = read_token_set(args.train_shards) if model.tail_proj is not None else None
    count = args.num_images or args.grid_images * args.grid_images
    every, record["grids"] = [], {}
    for class_id in args.class_ids:
        drawn = generate_class(sampler, class_id, count, tokens, args.sample_tail)
        with atomic_path(args.out / f"class-{class_id}_tokens.npy") as tmp, tmp.open("wb") as fh:
            np.save(fh, drawn.numpy())
        shown = drawn[: args.grid_images * args.grid_images].to(sampler.device)
        grid = save_image_grid(decode_images(vqgan, shown, sampler.grid_size, sampler.cfg.dtype),
                               args.out / f"class-{class_id}.png", nrow=args.grid_images)
        record["grids"][f"class-{class_id}"] = str(grid)
        every.append(drawn)
    record.update(classes=list(args.class_ids), samples_per_class=count, sample_tail=args.sample_tail)
    return torch.cat(every)


TASK_COLUMNS = ["input image", "VQGAN tokens decoded", "masked (grey: regenerated)", "completion"]


def _task_grids(sampler: MaskGitSampler, vqgan, val_shards: str, count: int, out: Path,
                load_inputs: Callable[[list[str]], torch.Tensor] | None = None) -> dict[str, str]:
    """Reconstruction / inpainting / outpainting grids of the first `count` val samples, one row each:
    the input image (when `load_inputs` maps sample keys to their tokenized crops), its tokens decoded,
    the masked canvas, the completion; each column named in the grid's header."""
    from lease.data import read_token_set
    from lease.evaluate.grids import masked_preview, save_comparison_grid

    val = read_token_set(val_shards)
    tokens = as_ids(val.vq[:count]).to(sampler.device)
    original = decode_images(vqgan, tokens, sampler.grid_size, sampler.cfg.dtype)
    inputs = [] if load_inputs is None else [_like(load_inputs(val.keys[:count]), original)]
    labels = TASK_COLUMNS[len(TASK_COLUMNS) - 3 - len(inputs):]
    written = {}
    for task in ("reconstruction", "inpainting", "outpainting"):
        regenerate = task_mask(task, tokens.shape[0], sampler.grid_size, sampler.generator, sampler.device)
        result = decode_images(vqgan, sampler.complete(tokens, regenerate), sampler.grid_size, sampler.cfg.dtype)
        path = out / f"{task}.png"
        save_comparison_grid([*inputs, original, masked_preview(original, regenerate, sampler.grid_size), result],
                             path, labels=labels)
        written[task] = str(path)
    return written


def _like(images: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """Input crops as float [0, 1] at the decoded images' size and device (a VQGAN may decode at another size)."""
    images = images.to(decoded.device)
    images = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    if images.shape[-2:] != decoded.shape[-2:]:
        images = torch.nn.functional.interpolate(images, size=decoded.shape[-2:], mode="bicubic", antialias=True)
    return images.clamp(0.0, 1.0)


def run(args: argparse.Namespace) -> int:
    from lease.checkpoints import model_from_checkpoint
    from lease.evaluate import config_from_args
    from lease.evaluate.grids import save_image_grid
    from lease.io import atomic_path, atomic_write_json
    from lease.typed_config import to_dict

    cfg = config_from_args(GenerateConfig, args, num_images=args.num_images)
    device = resolve_device(args.device)
    model = model_from_checkpoint(args.checkpoint, device)
    vqgan = load_vqgan_from_args(args, device)
    check_compatible(model, vqgan)
    sampler = MaskGitSampler(model, cfg, device)
    record = {"config": to_dict(cfg), "checkpoint": str(args.checkpoint), "vqgan": str(args.vqgan_checkpoint)}

    start = time.perf_counter()
    if args.class_ids:
        tokens = _class_samples(args, sampler, vqgan, record)
        record["generation_seconds"] = round(time.perf_counter() - start, 2)
    else:
        tokens = sampler.generate()
        record["generation_seconds"] = round(time.perf_counter() - start, 2)
        with atomic_path(args.out / "samples_tokens.npy") as tmp, tmp.open("wb") as fh:
            np.save(fh, tokens.numpy())
        preview = decode_images(vqgan, tokens[: args.grid_images * args.grid_images].to(device), sampler.grid_size,
                                cfg.dtype)
        save_image_grid(preview, args.out / "samples.png", nrow=args.grid_images)
        record["grids"] = {"samples": str(args.out / "samples.png")}
    if args.val_shards and not model.cfg.cond_classes:
        record["grids"].update(_task_grids(sampler, vqgan, args.val_shards, args.grid_images, args.out))
    if args.reference is not None:
        from lease.evaluate.fid import FidConfig, TokenImages, fid_is

        if args.inception_weights is None:
            raise SystemExit("--reference needs --inception-weights (the torch-fidelity inception-v3-compat file)")
        fid_cfg = FidConfig(weights=str(args.inception_weights))
        source = TokenImages(tokens, lambda t: decode_images(vqgan, t.to(device), sampler.grid_size, cfg.dtype),
                             uint8=cfg.uint8)
        record["fid"] = fid_is(source, args.reference, fid_cfg, device=device)
        atomic_write_json(args.out / "fid.json", {"protocol": "fid", **record["fid"]})
    atomic_write_json(args.out / "generate.json", record)
    log.info("wrote %s", args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    from lease.evaluate import command_main

    return command_main("lease eval generate", add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
