"""Typed configuration of the whole pipeline (`lease run --config configs/<preset>.yaml a.b=c ...`).

One YAML file holds every stage's section; `load_pipeline_config` validates all of it (unknown keys and
bad values fail naming the dotted key) before any stage starts. The `pretrain` section is the trainer's
own `lease.configs.TrainConfig` (its `preset` fills the model sizes); the flow fills `pretrain.data.shards`
and `pretrain.data.codebook` from the pack and k-means artifacts.

Paths may be the word `demo`: the data source then is the generated demo set, and tokenizer checkpoints
are tiny random-weight models written in the real checkpoint formats by the `demo-assets` stage.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lease.configs import CONDGEN_TEMPLATE, TrainConfig, condgen_train_config, train_config
from lease.evaluate.fid import FidConfig
from lease.evaluate.fewshot import FewShotConfig
from lease.evaluate.finetune import FinetuneConfig
from lease.evaluate.generate import GenerateConfig
from lease.evaluate.knn import KnnConfig
from lease.evaluate.linear_probe import ProbeConfig
from lease.evaluate.online import AugmentConfig
from lease.typed_config import ConfigError, apply_overrides, from_dict, load_yaml, require

DEMO = "demo"
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class DataConfig:
    """The image source that the manifest stage reads."""

    source: str = DEMO  # `demo`, an ImageFolder root, a list file, or WebDataset tars (dir or glob)
    kind: Literal["auto", "imagefolder", "list", "webdataset"] = "auto"
    val_fraction: float = 0.1  # held-out share of train when the source has no val split
    seed: int = 0
    check: Literal["full", "quick"] = "full"  # quick: headers + JPEG end markers (pipeline/manifest.py)
    num_workers: int = 2  # performance only: not part of the manifest's key
    manifest_name: str = ""  # set: the manifest is also written to data_manifests/<name>.parquet (to commit)

    def __post_init__(self) -> None:
        require(bool(self.source), "source", "give `demo` or a path to your images")
        require(re.fullmatch(r"[\w.-]*", self.manifest_name) is not None and not self.manifest_name.startswith("."),
                "manifest_name", "letters, digits, '_', '-' and '.' only (a file name under data_manifests/)")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        require(self.num_workers >= 0, "num_workers", "must be >= 0 (0: read in the main process)")


@dataclass
class DemoDataConfig:
    """The procedurally generated demo set (>= 10 classes, train and val splits)."""

    num_classes: int = 10
    train_per_class: int = 24
    val_per_class: int = 8
    image_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.num_classes >= 2, "num_classes", "must be >= 2")
        require(self.train_per_class > 0 and self.val_per_class > 0, "train_per_class",
                "train_per_class and val_per_class must be > 0")
        require(self.image_size >= 16, "image_size", "must be >= 16")


@dataclass
class VQGANConfig:
    """The generative tokenizer (DESIGN.md "Checkpoints and formats")."""

    kind: Literal["maskgit", "taming"] = "maskgit"
    checkpoint: str = DEMO  # vqgan_jax_strongaug.ckpt / taming .ckpt, or `demo`
    config: str = ""  # taming-transformers YAML (kind taming only)


@dataclass
class DinoConfig:
    """The DINOv2 feature extractor and the layer whose patch features are clustered."""

    kind: Literal["hf", "timm"] = "hf"
    # HF model directory or id (facebook/dinov2-base), a timm/Meta weights file (.pth/.safetensors) or timm name
    # (timm:vit_base_patch14_dinov2.lvd142m), or `demo`; names come from this machine's caches, never the network
    path: str = DEMO
    layer: int = -3  # third from last, as DiGIT's l3


@dataclass
class DemoAssetsConfig:
    """Sizes of the tiny random-weight tokenizers the demo uses (`lease.tokenizers.tiny`, real formats)."""

    vqgan_codes: int = 64  # n_embed: must equal pretrain.model.vocab_gen
    vqgan_channels: int = 32
    vqgan_res_blocks: int = 1
    vqgan_z_channels: int = 32
    dino_hidden: int = 128  # DINOv2's 64-dim heads
    dino_depth: int = 4
    dino_heads: int = 2
    dino_registers: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vqgan_codes", "vqgan_channels", "vqgan_res_blocks", "vqgan_z_channels", "dino_hidden",
                     "dino_depth", "dino_heads"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.dino_registers >= 0, "dino_registers", "must be >= 0")
        require(self.dino_hidden % self.dino_heads == 0, "dino_hidden", "must be divisible by dino_heads")


@dataclass
class TokenizersConfig:
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    dinov2: DinoConfig = field(default_factory=DinoConfig)
    demo: DemoAssetsConfig = field(default_factory=DemoAssetsConfig)

    def __post_init__(self) -> None:
        require(self.vqgan.kind != "taming" or self.vqgan.checkpoint == DEMO or bool(self.vqgan.config),
                "vqgan.config", "a taming-transformers checkpoint needs its YAML config")
        require(self.vqgan.checkpoint != DEMO or self.vqgan.kind == "maskgit", "vqgan.kind",
                "the demo tokenizer is a MaskGIT VQGAN: use kind maskgit with checkpoint demo")
        require(self.dinov2.path != DEMO or self.dinov2.kind == "hf", "dinov2.kind",
                "the demo DINOv2 is an HF directory: use kind hf with path demo")


@dataclass
class FeatureSampleConfig:
    """The random sample of DINOv2 patch features that k-means trains on."""

    num_images: int = 100_000
    patches_per_image: int = 64  # of the 256 per image
    seed: int = 0
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # DINOv2 compute dtype (auto: bf16 on GPU)
    batch_size: int = 256  # performance only
    num_workers: int = 8  # performance only

    def __post_init__(self) -> None:
        require(self.num_images > 0, "num_images", "must be > 0")
        require(self.patches_per_image > 0, "patches_per_image", "must be > 0")
        _check_loader(self.batch_size, self.num_workers)


def _check_loader(batch_size: int, num_workers: int) -> None:
    require(batch_size > 0, "batch_size", "must be > 0")
    require(num_workers >= 0, "num_workers", "must be >= 0 (0: decode in the main process)")


@dataclass
class KMeansConfig:
    """The discriminative codebook (DESIGN.md step 3); `codebook` set → use that file instead."""

    k: int = 16384
    iters: int = 20
    sample_size: int = 4_000_000  # vectors taken from the feature sample
    num_neighbours: int = 5
    seed: int = 0
    backend: Literal["auto", "faiss", "torch"] = "auto"
    codebook: str = ""  # existing centroids .npy float32 [K, D], e.g. DiGIT's km_16k.npy

    def __post_init__(self) -> None:
        require(self.k >= 2, "k", "must be >= 2")
        require(self.iters >= 1, "iters", "must be >= 1")
        require(self.sample_size >= self.k, "k", f"{self.k} centroids need at least as many points, but "
                f"kmeans.sample_size is {self.sample_size}")
        require(self.num_neighbours >= 0, "num_neighbours", "must be >= 0")
        require(self.num_neighbours < self.k, "num_neighbours", f"must be < k ({self.k})")


@dataclass
class TokenizeConfig:
    """The fused decode → VQGAN + DINOv2 → nearest-centroid pass."""

    batch_size: int = 128  # performance only
    num_workers: int = 8  # performance only
    images_per_shard: int = 10_000
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    gpu_decode: bool = False  # nvJPEG on the device (CUDA only)
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the tokenizers (auto: on CUDA)
    # Parts of the work that run as separate tasks (on the runner's workers), each whole shards; 0: one per
    # worker. Performance only: the stage's output is the same for any count.
    partitions: int = 0

    def __post_init__(self) -> None:
        _check_loader(self.batch_size, self.num_workers)
        require(self.images_per_shard > 0, "images_per_shard", "must be > 0")
        require(self.partitions >= 0, "partitions", "must be >= 0 (0: one per worker)")


@dataclass
class RunnerConfig:
    """Where the partitioned stages' tasks run: in the flow's process, or on a Dask cluster's workers."""

    kind: Literal["local", "dask"] = "local"
    address: str = ""  # a running Dask scheduler (tcp://host:8786); empty: start a cluster on this machine
    workers: int = 0  # workers of a local cluster; 0: one per visible GPU, or 2 CPU workers without GPUs

    def __post_init__(self) -> None:
        require(self.workers >= 0, "workers", "must be >= 0 (0: one per visible GPU, else 2)")
        require(not (self.address and self.kind == "local"), "address", "needs runner.kind=dask")


@dataclass
class PackConfig:
    samples_per_shard: int = 10_000
    seed: int = 0  # each split's samples are written in a permutation drawn from it (pipeline.pack)
    num_workers: int = 4  # performance only

    def __post_init__(self) -> None:
        require(self.samples_per_shard > 0, "samples_per_shard", "must be > 0")
        require(self.seed >= 0, "seed", "must be >= 0")
        require(self.num_workers >= 0, "num_workers", "must be >= 0")


@dataclass
class FidStageConfig:
    """FID / IS of the evaluate stage's samples against the manifest's val images (torch-fidelity).

    `inception` is torch-fidelity's Inception weights file (weights-inception-2015-12-05-6726825d.pth, the
    state dict its FeatureExtractorInceptionV3 loads), or `demo`: a random-weight extractor in that format
    from the demo-assets stage. Empty or missing on disk: fid.json says which file to provide. Nothing is
    ever downloaded."""

    inception: str = ""
    reference_images: int = 0  # val images the generated ones are compared with; 0: all of them
    image_size: int = 256  # reference images: centre square resized to this (the tokenizer input)
    batch_size: int = 64  # performance only
    isc_splits: int = 10
    # Inception's layer the FID compares: 2048 as every paper; the CPU demo uses 64, since the 2048-d
    # covariances' eigendecomposition alone takes ~30 s on 2 cores
    feature_layer: Literal["64", "192", "768", "2048"] = "2048"

    def __post_init__(self) -> None:
        require(self.reference_images >= 0, "reference_images", "must be >= 0 (0: every val image)")
        require(self.image_size > 0, "image_size", "must be > 0")
        require(self.batch_size > 0, "batch_size", "must be > 0")
        require(self.isc_splits > 0, "isc_splits", "must be > 0")


@dataclass
class DemoEvalSetConfig:
    """A generated evaluation set (`root: demo`, pipeline.demo_data): robustness sets draw the pretraining
    demo's classes in a corruption/severity layout, transfer sets new classes with train and val splits."""

    per_class: int = 2  # robustness: images per class, corruption and severity; transfer: train images per class
    val_per_class: int = 2  # transfer only
    num_classes: int = 4  # transfer only (robustness uses the pretraining demo's classes)
    corruptions: list[Literal["noise", "blur", "contrast"]] = field(default_factory=lambda: ["noise", "blur"])
    severities: list[int] = field(default_factory=lambda: [1, 3])  # robustness only
    image_size: int = 64
    seed: int = 1

    def __post_init__(self) -> None:
        require(self.per_class > 0 and self.val_per_class > 0, "per_class", "per_class and val_per_class must be > 0")
        require(self.num_classes >= 2, "num_classes", "must be >= 2")
        require(len(self.corruptions) > 0 and len(self.severities) > 0, "corruptions",
                "need at least one corruption and one severity")
        require(self.image_size >= 16, "image_size", "must be >= 16")


DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9_]*")
RESERVED_DATASET_NAMES = ("bank",)  # `eval-bank` is the robustness sets' shared train bank


@dataclass
class EvalDatasetConfig:
    """One evaluation dataset, a branch of the DAG (pipeline.stages, `eval-<name>`).

    robustness (paper table 5 / A.6): k-NN of its images against the pretraining train bank; its class
    folders are pretraining class names, or mapped to them by `class_map`. Layout `imagefolder` is
    root/<class>/<image> (ImageNet-V2, -Sketch, -R, -A, ObjectNet); `corruption` is
    root/<corruption>/<severity>/<class>/<image> (ImageNet-C), scored per corruption and severity too.
    transfer (table 4, C.8/C.9): its own classes, root/{train,val}/<class>/<image> or root/<class>/<image>
    with a seeded `val_fraction` held out; k-NN, linear probe and few-shot (`fewshot_shots`)."""

    name: str = ""
    role: Literal["robustness", "transfer"] = "robustness"
    root: str = ""  # an ImageFolder root, or `demo`
    layout: Literal["imagefolder", "corruption"] = "imagefolder"
    class_map: dict[str, str] = field(default_factory=dict)  # robustness: folder name -> pretraining class
    val_fraction: float = 0.2  # transfer without a val/ folder
    fewshot_shots: list[int] = field(default_factory=lambda: [4, 8])  # transfer
    seed: int = 0
    check: Literal["full", "quick"] = "full"
    demo: DemoEvalSetConfig = field(default_factory=DemoEvalSetConfig)

    def __post_init__(self) -> None:
        require(DATASET_NAME.fullmatch(self.name) is not None and self.name not in RESERVED_DATASET_NAMES, "name",
                f"{self.name!r}: give a name of lower-case letters, digits and _ (not {', '.join(RESERVED_DATASET_NAMES)})")
        require(bool(self.root), "root", "give an ImageFolder root or `demo`")
        require(self.role == "robustness" or self.layout == "imagefolder", "layout",
                "a transfer set is an ImageFolder (the corruption layout is for robustness sets)")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        require(len(self.fewshot_shots) > 0 and min(self.fewshot_shots) > 0, "fewshot_shots",
                "need at least one positive shot count")


@dataclass
class EvaluateConfig:
    """Protocols run on the pretrained encoder (configs of `lease.evaluate`), FID / IS (`fid`), and the
    evaluation datasets (`datasets`: each its own branch of stages).

    `protocol` (lease.evaluate.protocols): authors | paper probe online-tokenized augmented views (`augment`),
    fast probes the cached centre-crop tokens; k-NN always uses the cached tokens."""

    protocol: Literal["authors", "paper", "fast"] = "fast"
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear_probe: ProbeConfig = field(default_factory=ProbeConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(num_images=64))
    fid: FidStageConfig = field(default_factory=FidStageConfig)
    datasets: list[EvalDatasetConfig] = field(default_factory=list)
    grid_rows: int = 8  # rows of the sample and reconstruction/inpainting/outpainting grids
    batch_size: int = 256  # feature extraction; performance only
    dtype: Literal["auto", "bf16", "fp32"] = "auto"

    def __post_init__(self) -> None:
        require(self.grid_rows > 0, "grid_rows", "must be > 0")
        require(self.batch_size > 0, "batch_size", "must be > 0")
        names = [d.name for d in self.datasets]
        require(len(set(names)) == len(names), "datasets", f"names must differ: {names}")


@dataclass
class DemoClipConfig:
    """Sizes of the tiny random-weight CLIP that `condgen.clip: demo` reads (written by demo-assets)."""

    hidden_size: int = 32
    layers: int = 2
    heads: int = 2
    projection_dim: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "layers", "heads", "projection_dim"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.hidden_size % self.heads == 0, "hidden_size", "must be divisible by heads")


@dataclass
class FinetuneSection:
    """Full fine-tuning of the pretrained encoder (table 3, table A.3's recipe in `train`), its own stage
    `finetune` after pretrain: online RandAug views of the manifest's train split through the run's VQGAN,
    top-1/top-5 on its val split (`lease.evaluate.finetune`)."""

    enabled: bool = False
    train: FinetuneConfig = field(default_factory=FinetuneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # the views (randaug, val); image decoding

    def __post_init__(self) -> None:
        require(self.augment.num_workers >= 0, "augment.num_workers", "must be >= 0")


@dataclass
class CondGenSection:
    """Class-conditional generation from the frozen encoder (paper §4.4, `lease.condgen`): the stages
    class-embeddings → condgen (decoder fine-tuning, `train`: table A.5 where not set) → condgen-eval."""

    enabled: bool = False
    clip: str = ""  # a Hugging Face CLIPModel directory (read offline), or `demo`: the tiny random one
    template: str = CONDGEN_TEMPLATE  # the prompt per class name ("An image of a {}", Sorcen)
    names: str = ""  # class names file (one per line by label, or `wnid name` lines); "": the manifest's classes
    tail: Literal["centroids", "none"] = "centroids"  # the disc-centroid tail (LEASE) or the class token alone
    tail_positions: Literal["shared", "own"] = "shared"  # see README "Class-conditional generation"
    null_prob: float = 0.1  # training share of the null class token (classifier-free guidance)
    train: TrainConfig = field(default_factory=lambda: condgen_train_config({}))
    sample_tail: Literal["exemplar", "class_mode"] = "exemplar"  # the tail of a sample (lease.condgen)
    samples_per_class: int = 50
    classes: int = 0  # how many classes (the first by label) condgen-eval samples; 0: all
    grid_classes: int = 8  # classes with a grid PNG class-<id>.png
    grid_rows: int = 4
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(num_images=50))  # guidance here
    fid: FidConfig = field(default_factory=FidConfig)  # weights "": FID/IS are null with the file to provide
    demo: DemoClipConfig = field(default_factory=DemoClipConfig)

    def __post_init__(self) -> None:
        require(not self.enabled or bool(self.clip), "clip", "condgen needs a CLIP checkpoint: a Hugging Face "
                "CLIPModel directory, or `demo`")
        require(0.0 <= self.null_prob < 1.0, "null_prob", "must be in [0, 1)")
        require(self.samples_per_class > 0, "samples_per_class", "must be > 0")
        require(self.classes >= 0, "classes", "must be >= 0 (0: all)")
        require(self.grid_classes >= 0 and self.grid_rows > 0, "grid_rows", "grid_rows > 0, grid_classes >= 0")


@dataclass
class PipelineConfig:
    name: str = "lease"
    artifacts: str = "artifacts"  # root of artifacts/<stage>/<key>/ (relative to the working directory)
    device: str = "auto"  # auto: cuda when present, else cpu
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    demo_data: DemoDataConfig = field(default_factory=DemoDataConfig)
    tokenizers: TokenizersConfig = field(default_factory=TokenizersConfig)
    features: FeatureSampleConfig = field(default_factory=FeatureSampleConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    condgen: CondGenSection = field(default_factory=CondGenSection)

    def __post_init__(self) -> None:
        require(bool(self.name), "name", "must not be empty")
        require(bool(self.artifacts), "artifacts", "give the directory that holds the stage artifacts")
        require(DEVICE.fullmatch(self.device) is not None, "device",
                f"{self.device!r} is not a device: use auto, cpu, cuda or cuda:<index>")

    @property
    def uses_demo_data(self) -> bool:
        return self.data.source == DEMO

    @property
    def uses_demo_assets(self) -> bool:
        return (self.tokenizers.vqgan.checkpoint == DEMO or self.tokenizers.dinov2.path == DEMO
                or self.evaluate.fid.inception == DEMO)

    @property
    def uses_demo_clip(self) -> bool:
        return self.condgen.enabled and self.condgen.clip == DEMO


def preset_path(name_or_path: str | Path) -> Path:
    """`demo` → configs/demo.yaml; anything else is taken as a path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and (CONFIG_DIR / f"{path}.yaml").is_file():
        return CONFIG_DIR / f"{path}.yaml"
    return path


def pipeline_config(data: dict[str, Any], machine_checks: bool = True) -> PipelineConfig:
    """Validate plain data into a PipelineConfig; `pretrain` goes through the trainer's own loader.
    `machine_checks` (on for a run) also checks that paths exist and the device is there."""
    data = dict(data)
    pretrain = data.pop("pretrain", None) or {}
    if not isinstance(pretrain, dict):
        raise ConfigError(f"pretrain: expected a mapping, got {pretrain!r}")
    condgen_train = _pop_condgen_train(data)
    cfg = from_dict(PipelineConfig, data)
    cfg.condgen.train = condgen_train
    try:
        cfg.pretrain = train_config(pretrain)
    except ConfigError as err:
        raise ConfigError(_under("pretrain", str(err))) from None
    _check_consistency(cfg)
    if machine_checks:
        _check_paths(cfg)
        _resolve_checkpoint_names(cfg)
        _check_device(cfg.device)
    return cfg


def _pop_condgen_train(data: dict[str, Any]) -> TrainConfig:
    """`condgen.train` through `lease.condgen.condgen_train_config` (table A.5 where not set)."""
    section = data.get("condgen")
    if section is None:
        return condgen_train_config({})
    if not isinstance(section, dict):
        raise ConfigError(f"condgen: expected a mapping, got {section!r}")
    section = dict(section)
    train = section.pop("train", None) or {}
    data["condgen"] = section
    if not isinstance(train, dict):
        raise ConfigError(f"condgen.train: expected a mapping, got {train!r}")
    try:
        return condgen_train_config(train)
    except ConfigError as err:
        raise ConfigError(_under("condgen.train", str(err))) from None


def _check_device(device: str) -> None:
    """A CUDA device must exist here: otherwise the run would fail at its first GPU stage."""
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    require(index < count, "device", f"{device} was asked for, but torch sees {count} CUDA device(s) here: "
                                     "use device=auto or cpu")


def _check_consistency(cfg: PipelineConfig) -> None:
    """Cross-section facts that would otherwise fail hours into a run."""
    if cfg.tokenizers.vqgan.checkpoint == DEMO:
        codes = cfg.tokenizers.demo.vqgan_codes
        require(cfg.pretrain.model.vocab_gen == codes, "pretrain.model.vocab_gen",
                f"must equal the demo VQGAN's {codes} codes (tokenizers.demo.vqgan_codes)")
    if not cfg.kmeans.codebook:
        sampled = cfg.features.num_images * cfg.features.patches_per_image
        require(sampled >= cfg.kmeans.k, "kmeans.k",
                f"{cfg.kmeans.k} centroids need at least as many sampled features; features.num_images x "
                f"features.patches_per_image gives {sampled}")


def _under(section: str, message: str) -> str:
    """Re-root a nested config's error message under `section` (`model.depth` → `pretrain.model.depth`)."""
    head, sep, tail = message.partition("valid keys under '")
    if message.startswith("unknown key '") and sep:
        head = head.replace("unknown key '", f"unknown key '{section}.", 1)
        tail = tail.replace("<top>'", f"{section}'", 1) if tail.startswith("<top>'") else f"{section}.{tail}"
        return head + sep + tail
    return f"{section}.{message}"


def _resolve_checkpoint_names(cfg: PipelineConfig) -> None:
    """`tokenizers.dinov2.path` may name a checkpoint (an HF id, or `timm:NAME`): it becomes the local copy
    in this machine's caches (`lease.tokenizers.hub_cache`); an uncached name fails here, saying how to
    bring it."""
    from lease.tokenizers.hub_cache import TIMM_PREFIX, NotCachedError, is_checkpoint_name, resolve_checkpoint

    dino = cfg.tokenizers.dinov2
    if dino.path == DEMO or not is_checkpoint_name(dino.path):
        return
    wanted = "timm" if dino.path.startswith(TIMM_PREFIX) else "hf"
    require(dino.kind == wanted, "tokenizers.dinov2.kind",
            f"{dino.path} is a{' timm' if wanted == 'timm' else 'n HF'} checkpoint name: use kind {wanted}")
    try:
        dino.path = str(resolve_checkpoint(dino.path))
    except NotCachedError as err:
        raise ConfigError(f"tokenizers.dinov2.path: {err}") from None


def _check_paths(cfg: PipelineConfig) -> None:
    """External files must exist before any work starts (`demo` stands for generated ones)."""
    checks = [("data.source", cfg.data.source), ("tokenizers.vqgan.checkpoint", cfg.tokenizers.vqgan.checkpoint),
              ("tokenizers.dinov2.path", cfg.tokenizers.dinov2.path)]
    if cfg.tokenizers.vqgan.kind == "taming":
        checks.append(("tokenizers.vqgan.config", cfg.tokenizers.vqgan.config))
    if cfg.kmeans.codebook:
        checks.append(("kmeans.codebook", cfg.kmeans.codebook))
    checks += [(f"evaluate.datasets[{i}].root", d.root) for i, d in enumerate(cfg.evaluate.datasets)]
    if cfg.condgen.enabled:
        checks += [("condgen.clip", cfg.condgen.clip)] + ([("condgen.names", cfg.condgen.names)]
                                                          if cfg.condgen.names else [])
    from lease.tokenizers.hub_cache import is_checkpoint_name

    for key, value in checks:
        if value == DEMO or any(ch in value for ch in "*?["):  # a glob of tar shards is checked by the stage
            continue
        if key == "tokenizers.dinov2.path" and is_checkpoint_name(value):  # `_resolve_checkpoint_names`'
            continue
        require(Path(value).exists(), key, f"{value} does not exist")


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None,
                         machine_checks: bool = True) -> PipelineConfig:
    """Read a preset or YAML file, apply `a.b=c` overrides, validate everything (`machine_checks`: see
    `pipeline_config`)."""
    return pipeline_config(apply_overrides(load_yaml(preset_path(path)), list(overrides or [])), machine_checks)


__all__ = ["PipelineConfig", "ConfigError", "load_pipeline_config", "pipeline_config",
           "preset_path", "DEMO"]
