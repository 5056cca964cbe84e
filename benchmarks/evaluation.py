"""`lease bench eval`: the evaluation paths of issue 24 at ViT-B / ImageNet sizes on one GPU.

- online linear probe: the `authors` protocol's training step as `lease.evaluate.protocols.online_probe`
  runs it (JPEG decode + RandomResizedCrop/flip in loader workers, compiled MaskGIT VQGAN of MAGE's sizes,
  frozen ViT-B encoder with the mean_ln feature, BatchNorm + linear head, LARS); target >= 2,000 img/s;
- fine-tuning: `lease.evaluate.finetune.finetune` (timm RandAug views, Mixup/CutMix on the GPU, VQGAN,
  ViT-B forward + backward with drop path, AdamW with layer-wise decay); target >= 1,200 img/s, the rate of
  its last epoch (the first one warms up);
- a robustness set's k-NN: 50K queries against the 1.28M-image train bank (`knn_classify`), with the
  features of the 50K queries extracted by the encoder; target < 60 s with its tokenization at the
  end-to-end tokenize rate recorded in benchmarks/results (its estimate is added, not measured here).

The weights are random (timings do not depend on them) and the images synthetic JPEGs of ImageNet's
typical size, written once and read repeatedly; the k-NN bank features are random at ViT-B's width.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.records import RESULTS_DIR, write_record

log = logging.getLogger(__name__)
TOKENIZE_RECORD = "tokenize-end-to-end-cpudecode-compile_auto.json"  # the recorded end-to-end tokenize rate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--files", type=int, default=512, help="distinct synthetic JPEGs (read repeatedly)")
    parser.add_argument("--width", type=int, default=500, help="JPEG width (ImageNet's typical 500 x 375)")
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--probe-batch", type=int, default=1024)
    parser.add_argument("--probe-steps", type=int, nargs=2, default=[8, 40], metavar=("SHORT", "LONG"),
                        help="steps of the two timed probe epochs; the rate is that of the steps the long one adds")
    parser.add_argument("--vqgan-chunk", type=int, default=0,
                        help="images per VQGAN call (0: evaluate.augment.batch_size's default)")
    parser.add_argument("--finetune-batch", type=int, default=512)
    parser.add_argument("--finetune-steps", type=int, nargs=2, default=[8, 32], metavar=("SHORT", "LONG"),
                        help="steps per epoch of the two timed fine-tuning runs (two epochs each; the second timed)")
    parser.add_argument("--time-loaders", action="store_true",
                        help="also time the loaders alone (decode + augmentation, no GPU work) for each view")
    parser.add_argument("--workers", type=int, default=0, help="decode workers (0: every CPU core but one)")
    parser.add_argument("--knn-train", type=int, default=1_281_167)
    parser.add_argument("--knn-query", type=int, default=50_000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["probe", "finetune", "knn"])
    parser.add_argument("--out-dir", default=None, help="where the JSON record goes (default benchmarks/results)")


def _write_jpeg(task: tuple[Path, int, int, int]) -> str:
    """Smooth random colour fields with some noise (numpy and PIL only: it runs in forked workers, where
    torch's thread pool must not be used)."""
    path, width, height, seed = task
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8), "RGB")
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=90)
    return str(path)


def synthetic_jpegs(folder: Path, count: int, width: int, height: int, workers: int) -> list[str]:
    with ProcessPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(_write_jpeg, [(folder / f"{i:05d}.jpg", width, height, i) for i in range(count)]))


def vit_base_encoder(device: torch.device):
    """A random-weight LEASE ViT-B (the paper's encoder) in eval mode, for the probe and fine-tuning."""
    from lease.configs import train_config
    from lease.train import build_model

    cfg = train_config({"preset": "vit_base", "model": {"vocab_gen": 1024, "contrast_on": "none"}})
    return build_model(cfg, None).to(device).eval()


def _views(locations: list[str], count: int, view: str, aug, num_classes: int = 1000):
    from lease.evaluate.online import AugmentedImages, view_transform
    from lease.images import decode_location

    picked = [locations[i % len(locations)] for i in range(count)]
    return AugmentedImages(picked, [i % num_classes for i in range(count)], view_transform(aug, view), decode_location)


def marginal_rate(seconds: dict[int, float], batch: int) -> dict:
    """images/s of the steps a long epoch adds to a short one, (long − short)·batch / (T_long − T_short): what
    an ImageNet-long epoch runs at, without what every epoch pays once (starting the loader workers, which
    each assemble a whole first batch before any step runs). `seconds` maps steps to an epoch's time."""
    (short, t_short), (long, t_long) = sorted(seconds.items())
    return {"images_per_s": round((long - short) * batch / max(t_long - t_short, 1e-9), 1),
            "epoch_seconds": {str(k): round(v, 3) for k, v in sorted(seconds.items())},
            "epoch_fill_seconds": round(max(t_short - short * (t_long - t_short) / (long - short), 0.0), 3)}


def bench_probe(model, tokenizer, locations: list[str], args, aug) -> dict:
    """The online probe's images/s (`marginal_rate` of two epochs of `probe_steps` full batches), after a
    warm-up call that compiles the VQGAN for the batch's chunks."""
    from lease.evaluate.linear_probe import ProbeConfig
    from lease.evaluate.protocols import ONLINE, online_probe

    device, settings = tokenizer.device, ONLINE["authors"]
    val = (torch.randn(256, model.cfg.embed_dim, device=device), torch.arange(256, device=device) % 1000)
    cfg = ProbeConfig(batch_size=args.probe_batch, epochs=1, num_classes=1000)
    online_probe(model, tokenizer, _views(locations, 2 * args.probe_batch, "train", aug), val, 1000, cfg, aug,
                 settings, "bf16")
    seconds = {steps: online_probe(model, tokenizer, _views(locations, steps * args.probe_batch, "train", aug),
                                   val, 1000, cfg, aug, settings, "bf16")["seconds"] for steps in args.probe_steps}
    return {**marginal_rate(seconds, args.probe_batch), "batch": args.probe_batch, "vqgan_chunk": tokenizer.chunk,
            "target_images_per_s": 2000,
            "gpu_ms_per_step": probe_step_parts(model, tokenizer, locations, args, aug, settings, cfg)}


def probe_step_parts(model, tokenizer, locations: list[str], args, aug, settings, cfg) -> dict[str, float]:
    """Median GPU milliseconds of one probe step's parts on a device-resident batch of train views (CUDA
    events, no loader): the VQGAN alone, the frozen encoder's features from its tokens, and the whole step
    as `online_probe` runs it. The step's time against the epoch's time per step says whether the GPU or the
    host (loader, pinning, copies) bounds the probe."""
    import statistics

    from benchmarks.timing import time_cuda
    from lease.evaluate.lars import LARS
    from lease.evaluate.linear_probe import ProbeHead
    from lease.evaluate.online import epoch_loader
    from lease.evaluate.protocols import compiled_encoder_features, embedding_dropout, online_features

    views = _views(locations, args.probe_batch, "train", aug)
    images = next(iter(epoch_loader(views, 0, args.probe_batch, aug.num_workers, True)))[0].to(tokenizer.device)
    labels = torch.arange(args.probe_batch, device=tokenizer.device) % 1000
    tokens = tokenizer(images)
    head = ProbeHead(model.cfg.embed_dim, 1000, cfg.bn_eps, cfg.head_init_std, torch.Generator().manual_seed(0))
    head = head.to(tokenizer.device)
    optimizer = LARS(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                     trust_coefficient=cfg.trust_coefficient)

    def features_from_tokens():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return compiled_encoder_features()(model, tokens, settings.pool)

    def whole_step():
        loss = F.cross_entropy(head(online_features(model, tokenizer, images, settings.pool, "bf16")), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    parts = {"vqgan": lambda: tokenizer(images), "encoder_features": features_from_tokens, "step": whole_step}
    with embedding_dropout(model, settings.embed_dropout):  # the train-mode graphs `online_probe` runs
        medians = {name: round(statistics.median(time_cuda(fn, warmup=2, steps=5)), 2) for name, fn in parts.items()}
    log.info("probe step on a resident batch of %d: %s ms", args.probe_batch, medians)
    return medians


def bench_finetune(model, tokenizer, locations: list[str], args, aug, out: Path) -> dict:
    """Fine-tuning's images/s: `marginal_rate` of the second epochs of two runs of `finetune_steps` steps per
    epoch (`finetune` times each epoch's training steps; the first epoch warms up)."""
    from lease.evaluate.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(batch_size=args.finetune_batch, epochs=2, warmup_epochs=0, dtype="bf16")
    seconds, rates = {}, {}
    for steps in args.finetune_steps:
        result = finetune(model, tokenizer, _views(locations, steps * args.finetune_batch, "randaug", aug),
                          _views(locations, args.finetune_batch, "val", aug), 1000, cfg, aug, out / f"steps{steps}")
        rates[str(steps)] = [epoch["train_images_per_s"] for epoch in result["history"]]
        seconds[steps] = steps * args.finetune_batch / rates[str(steps)][-1]
    return {**marginal_rate(seconds, args.finetune_batch), "epoch_rates": rates, "batch": args.finetune_batch,
            "target_images_per_s": 1200,
            "gpu_ms_per_step": finetune_step_parts(model, tokenizer, locations, args, aug, cfg)}


def finetune_step_parts(model, tokenizer, locations: list[str], args, aug, cfg) -> dict[str, float]:
    """Median GPU milliseconds of one fine-tuning step's parts on a device-resident batch of randaug views
    (CUDA events, no loader): the VQGAN alone, the classifier's forward + backward + AdamW from tokens
    (compiled as `finetune` runs it, and eager), and the whole `train_step` (mixup, VQGAN, classifier,
    AdamW), as `probe_step_parts` does for the probe."""
    import statistics

    from benchmarks.timing import time_cuda
    from lease.evaluate.finetune import FinetuneClassifier, classifier_update, mixup_for, optimizer_for, train_step
    from lease.evaluate.online import epoch_loader, to_unit

    batch, device = args.finetune_batch, tokenizer.device
    views = _views(locations, batch, "randaug", aug)
    images, labels = next(iter(epoch_loader(views, 0, batch, aug.num_workers, True)))
    images, labels = images.to(device), labels.to(device)
    classifier = FinetuneClassifier(model, 1000, cfg.drop_path).to(device).train()
    optimizer, mixup, tokenizer = optimizer_for(classifier, cfg), mixup_for(cfg, 1000), tokenizer.resized(batch)
    tokens, soft = tokenizer(to_unit(images, device)), torch.full((batch, 1000), 1e-3, device=device)

    compiled = torch.compile(classifier)
    parts = {"vqgan": lambda: tokenizer(to_unit(images, device)),
             "classifier_step_eager": lambda: classifier_update(classifier, optimizer, tokens, soft, "bf16"),
             "classifier_step": lambda: classifier_update(compiled, optimizer, tokens, soft, "bf16"),
             "step": lambda: train_step(compiled, tokenizer, optimizer, mixup, images, labels, "bf16")}
    medians = {name: round(statistics.median(time_cuda(fn, warmup=2, steps=5)), 2) for name, fn in parts.items()}
    log.info("fine-tuning step on a resident batch of %d: %s ms", batch, medians)
    return medians


def bench_loaders(locations: list[str], args, aug) -> dict:
    """Each view's loader alone (decode + augmentation in the workers, batches collated, nothing on the GPU):
    `marginal_rate` over epochs of the probe's and fine-tuning's step counts."""
    from lease.evaluate.online import epoch_loader

    rates = {}
    for view, batch, counts in (("train", args.probe_batch, args.probe_steps),
                                ("randaug", args.finetune_batch, args.finetune_steps)):
        seconds = {}
        for steps in counts:
            started = time.perf_counter()
            for _ in epoch_loader(_views(locations, steps * batch, view, aug), 0, batch, aug.num_workers, True):
                pass
            seconds[steps] = time.perf_counter() - started
        rates[view] = {**marginal_rate(seconds, batch), "batch": batch}
        log.info("loader alone, %s view: %.0f img/s", view, rates[view]["images_per_s"])
    return rates


def bench_knn(model, args, device: torch.device) -> dict:
    """k-NN of `knn_query` queries against a `knn_train` bank: the queries' encoder features extracted from
    random token grids, the bank random features of the same width; plus the tokenize-rate estimate."""
    from lease.evaluate.features import extract_features
    from lease.evaluate.knn import knn_classify

    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, model.cfg.vocab_gen, (args.knn_query, model.cfg.seq_len), generator=gen, device=device)
    extract_features(model, tokens[:1024], 1024, device=device, dtype="bf16")  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    queries = extract_features(model, tokens, 1024, device=device, dtype="bf16")
    torch.cuda.synchronize()
    feature_seconds = time.perf_counter() - start
    bank = torch.randn(args.knn_train, queries.shape[1], generator=gen, device=device, dtype=torch.float16)
    bank_labels = torch.randint(0, 1000, (args.knn_train,), generator=gen, device=device)
    query_labels = torch.randint(0, 1000, (args.knn_query,), generator=gen, device=device)
    knn_classify(bank[:4096], bank_labels[:4096], queries[:1024], query_labels[:1024], device=device)  # warm-up
    torch.cuda.synchronize()
    knn = knn_classify(bank, bank_labels, queries, query_labels, device=device)
    rate = _recorded_tokenize_rate()
    tokenize_seconds = args.knn_query / rate if rate else None
    total = feature_seconds + knn["seconds"] + (tokenize_seconds or 0.0)
    return {"queries": args.knn_query, "bank": args.knn_train, "feature_seconds": round(feature_seconds, 3),
            "knn_seconds": knn["seconds"], "tokenize_images_per_s_recorded": rate,
            "tokenize_seconds_estimate": None if tokenize_seconds is None else round(tokenize_seconds, 2),
            "total_seconds": round(total, 2), "target_seconds": 60,
            "note": "bank features random at ViT-B's width; query features from random token grids through the "
                    "encoder; tokenization estimated from the recorded end-to-end tokenize rate"}


def _recorded_tokenize_rate() -> float | None:
    """The end-to-end tokenize images/s of the recorded run (JPEG decode + VQGAN + DINOv2 + assignment)."""
    path = RESULTS_DIR / TOKENIZE_RECORD
    return json.loads(path.read_text())["results"]["images_per_s"] if path.is_file() else None


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("lease bench eval measures GPU throughput: no CUDA device found")
    import os

    from benchmarks.tokenizers import full_width_maskgit_config, random_maskgit_tokenizer
    from lease.evaluate.online import AugmentConfig, OnlineTokenizer

    device = torch.device("cuda")
    workers = args.workers or max(1, (os.cpu_count() or 2) - 1)
    aug = AugmentConfig(batch_size=256, num_workers=workers)
    model = vit_base_encoder(device)
    vqgan = random_maskgit_tokenizer(full_width_maskgit_config(), device, torch.bfloat16, compile=True)
    tokenizer = OnlineTokenizer(vqgan, args.vqgan_chunk or aug.batch_size)
    results: dict = {"workers": workers, "jpeg": [args.width, args.height]}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        locations = synthetic_jpegs(Path(tmp), args.files, args.width, args.height, workers)
        log.info("%d synthetic JPEGs in %.1f s", len(locations), time.perf_counter() - started)
        if args.time_loaders:
            results["loaders"] = bench_loaders(locations, args, aug)
            _record(results, args)
        if "probe" not in args.skip:
            results["probe"] = bench_probe(model, tokenizer, locations, args, aug)
            log.info("online probe: %.0f img/s", results["probe"]["images_per_s"])
            _record(results, args)  # each part as it ends: a run stopped later keeps what it measured
        if "finetune" not in args.skip:
            results["finetune"] = bench_finetune(model, tokenizer, locations, args, aug, Path(tmp) / "finetune")
            log.info("fine-tuning: %.0f img/s", results["finetune"]["images_per_s"])
            _record(results, args)
    if "knn" not in args.skip:
        results["knn"] = bench_knn(vit_base_encoder(device), args, device)
        log.info("k-NN of %d against %d: %.1f s", args.knn_query, args.knn_train, results["knn"]["total_seconds"])
    _record(results, args)
    return 0


def _record(results: dict, args: argparse.Namespace) -> None:
    results["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    write_record("eval-vit_base", {"results": results}, args.out_dir)

