"""The DAG's stage table: what each stage's cache key depends on and how it builds its artifact.

    demo-data (demo source only) ──> manifest ──> features ──> kmeans ──> tokenize ──> pack
                                 └─────────────────> vq-codes ─────────┘
    demo-assets (tiny checkpoints) ──> features, vq-codes, tokenize
    then:  pack + kmeans ──> pretrain ──> evaluate ──> report
                                   (eval-<name> per evaluate.datasets, condgen-eval) ──┘
    with condgen.enabled:  manifest + demo-clip ──> class-embeddings;  pretrain + class-embeddings ──> condgen ──> condgen-eval

`vq-codes` holds the VQGAN's codes, whose key leaves out the codebook; `tokenize` adds DINOv2's nearest
centroids to them. A new codebook (`kmeans.k`, ...) reruns only `tokenize` (DINOv2 + assignment, no
VQGAN) and what follows; when both are missing, tokenize's part tasks build vq-codes' parts in the same
pass (each image decoded once, both networks on one batch: `Partitions.fuses`).
`features` is skipped when `kmeans.codebook` names an existing codebook; `demo-data` and `demo-assets`
run only when the config says `demo` for the images or the tokenizer checkpoints.

Each `build_*` is a plain call into `pipeline/` or `lease/` that writes one artifact directory; it knows
nothing of Prefect. `flows/lease_flow.py` runs these stages as cached Prefect tasks, and
`lease bench precompute` runs the tokenization stages directly through `ArtifactStore` to time them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from lease.io import atomic_write_bytes, atomic_write_json, json_digest
from lease.typed_config import ConfigError, to_dict
from pipeline.artifacts import KEY_LENGTH, RECORD_NAME, ArtifactStore, StageOutcome, StageSpec, input_digest
from pipeline.code_version import combined_identity
from pipeline.config import DEMO, PipelineConfig

log = logging.getLogger(__name__)
Dirs = dict[str, Path]  # upstream stage name -> its artifact directory


# ------------------------------------------------------------------------------------ stage table


@dataclass(frozen=True)
class ExternalInput:
    """A user-supplied file or directory a stage reads (checkpoint, codebook, image tree)."""

    path: str
    tree: bool = False  # a data tree: its key digest reads file names, sizes and mtimes, not contents


@dataclass(frozen=True)
class Partitions:
    """A stage whose work runs as separate tasks, one per part of its input, on the runner's workers.

    `plan(cfg, dirs, count)` cuts the work into at most `count` JSON-able parts, each with a "rows" digest
    of the input rows it covers; `build(cfg, dirs, part, out)` writes one part's outputs. The stage's own
    build then merges the parts' directories, which it finds as `dirs["part-<i>"]`.
    """

    plan: Callable[[PipelineConfig, Dirs, int], list[dict[str, Any]]]
    build: Callable[[PipelineConfig, Dirs, dict[str, Any], Path], dict[str, Any]]
    release: Callable[[], None] = lambda: None  # frees what the parts kept loaded, in the process that ran them
    # An upstream partitioned stage (same plan) whose part this stage's part task builds in the same pass
    # when both are missing: `fused_build(cfg, dirs, part, upstream_out, out)` returns both summaries.
    fuses: str = ""
    fused_build: Callable[[PipelineConfig, Dirs, dict[str, Any], Path, Path],
                          tuple[dict[str, Any], dict[str, Any]]] | None = None


@dataclass(frozen=True)
class Stage:
    """One node of the DAG: what its key depends on and how to build its artifact."""

    name: str
    after: tuple[str, ...]  # upstream stages (those enabled for a config)
    config: Callable[[PipelineConfig], dict[str, Any]]  # the config that determines the output
    build: Callable[[PipelineConfig, Dirs, Path], dict[str, Any]]  # writes into the dir, returns a summary
    inputs: Callable[[PipelineConfig], dict[str, ExternalInput]] = lambda cfg: {}
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True
    on_device: bool = False  # its numbers depend on the device it runs on (cpu or cuda): part of the key
    partitions: Partitions | None = None
    dataset: str = ""  # a stage of an evaluation dataset's branch: the dataset's name, passed to its build
    after_config: Callable[[PipelineConfig], tuple[str, ...]] = lambda cfg: ()  # upstream stages the config names
    # After the stage completes, built or cached: copies its output somewhere the user named (not its key)
    publish: Callable[[PipelineConfig, Path], None] | None = None

    def upstream(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """Every upstream stage name for `cfg`: the fixed ones and those the config names."""
        return self.after + self.after_config(cfg)

    def builder(self, cfg: PipelineConfig, dirs: Dirs, part: dict[str, Any] | None = None
                ) -> Callable[[Path], dict[str, Any]]:
        """`build(out)` for this stage (or one part of it) on the given upstream directories."""
        extra = {"dataset": self.dataset} if self.dataset else {}
        if part is not None:
            assert self.partitions is not None
            return functools.partial(self.partitions.build, cfg, dirs, part, **extra)
        return functools.partial(self.build, cfg, dirs, **extra)

    @property
    def functions(self) -> tuple[Callable, ...]:
        """The code that builds the artifact: what its code version digests."""
        parts = (self.partitions.plan, self.partitions.build) if self.partitions else ()
        # A fused pass writes this stage's parts (downstream of it) or its upstream's (this stage fuses)
        fused = [s.partitions.fused_build for s in STAGES.values()
                 if s.partitions and s.partitions.fused_build and self.name in (s.name, s.partitions.fuses)]
        return (self.build, *parts, *fused)

    def spec(self, cfg: PipelineConfig, done_keys: dict[str, str]) -> StageSpec:
        """The stage's cache identity from the keys of the stages done so far (its own upstream ones are
        taken; a disabled upstream stage is simply absent). Digests its external inputs, so a missing
        checkpoint fails here. The code is what the build function imports (`pipeline.code_version`)."""
        upstream = {name: done_keys[name] for name in self.upstream(cfg) if name in done_keys}
        config = self.config(cfg)
        if self.on_device:
            config = {**config, "device": _device(cfg)}
        code = combined_identity(self.functions)
        inputs = self.inputs(cfg)
        return StageSpec(stage=self.name, config=config, code_version=json_digest(code)[:KEY_LENGTH],
                         upstream=upstream, code=code,
                         inputs={name: input_digest(i.path, content=not i.tree) for name, i in inputs.items()},
                         input_paths={name: i.path for name, i in inputs.items()})


PART_SUFFIX = "-part"  # a partitioned stage's parts are artifacts of the stage `<name>-part`


def part_specs(stage: Stage, cfg: PipelineConfig, dirs: Dirs, spec: StageSpec, count: int
               ) -> list[tuple[StageSpec, dict[str, Any]]]:
    """The parts of a partitioned stage, each keyed by the stage's key and the digest of its rows: a rerun
    after a crash or a lost worker rebuilds only the parts that did not finish."""
    assert stage.partitions is not None
    return [(StageSpec(stage=stage.name + PART_SUFFIX, config={"of": spec.key, "rows": part["rows"]},
                       code_version=spec.code_version, upstream=dict(spec.upstream)), part)
            for part in stage.partitions.plan(cfg, dirs, count)]


@dataclass(frozen=True)
class Fusion:
    """Two partitioned stages built by one pass: `stage`'s part tasks also build `upstream`'s parts of the
    same rows (its `Partitions.fuses`), because both are missing and one decode serves both."""

    stage: Stage
    spec: StageSpec
    dirs: Dirs  # the stage's upstream directories, without `upstream` (not built yet)
    upstream: Stage
    upstream_spec: StageSpec


def fusion_for(upstream: Stage, cfg: PipelineConfig, spec: StageSpec, keys: dict[str, str], dirs: Dirs,
               store: ArtifactStore, forced: set[str]) -> Fusion | None:
    """The fused pass for `upstream` (whose parts must be built; `spec` its key) when the stage that fuses
    it is enabled, has everything else it needs done and must build too; None otherwise."""
    stage = next((s for s in STAGES.values() if s.partitions and s.partitions.fuses == upstream.name), None)
    if stage is None or not stage.enabled(cfg):
        return None
    needed = [name for name in stage.upstream(cfg) if name != upstream.name and STAGES[name].enabled(cfg)]
    if any(name not in keys or name not in dirs for name in needed):
        return None
    try:
        stage_spec = stage.spec(cfg, {**keys, upstream.name: spec.key})
    except (OSError, ValueError, ImportError):  # its inputs are not there: it fails with its own message later
        return None
    if stage.name not in forced and store.is_complete(stage_spec):
        return None
    return Fusion(stage, stage_spec, {name: dirs[name] for name in needed}, upstream, spec)


def fused_part_specs(fusion: Fusion, cfg: PipelineConfig, upstream_dirs: Dirs, count: int
                     ) -> list[tuple[tuple[StageSpec, dict[str, Any]], StageSpec]]:
    """[((the stage's part spec, part), the upstream's part spec of the same rows)]."""
    own = part_specs(fusion.stage, cfg, fusion.dirs, fusion.spec, count)
    theirs = part_specs(fusion.upstream, cfg, upstream_dirs, fusion.upstream_spec, count)
    if [part["rows"] for _, part in own] != [part["rows"] for _, part in theirs]:
        raise ValueError(f"{fusion.stage.name} and {fusion.upstream.name} cut their parts differently: "
                         "a fused pass needs one plan")
    return [(mine, other) for mine, (other, _) in zip(own, theirs)]


def run_fused_part(store: ArtifactStore, cfg: PipelineConfig, stage: Stage, dirs: Dirs, part: dict[str, Any],
                   spec: StageSpec, upstream_spec: StageSpec, upstream_dirs: Dirs, *, force: bool = False,
                   upstream_force: bool = False, **run_options: Any) -> StageOutcome:
    """Build one part of `stage` and the same rows' part of the stage it fuses (`upstream_spec`), each
    from the other's files when that one exists, else both in one pass. The upstream part is published
    first: a crash between the two leaves a state the next run finishes from the files."""
    upstream = STAGES[stage.partitions.fuses]
    upstream_path = store.path(upstream_spec.stage, upstream_spec.key)
    with_upstream = {**dirs, upstream.name: upstream_path}
    if not upstream_force and store.is_complete(upstream_spec):  # this part alone, reading the upstream's
        return store.run(spec, functools.partial(stage.partitions.build, cfg, with_upstream, part), force=force,
                         **run_options)
    if not force and store.is_complete(spec):  # only the upstream part is missing
        store.run(upstream_spec, functools.partial(upstream.partitions.build, cfg, upstream_dirs, part),
                  force=upstream_force, **run_options)
        return store.run(spec, functools.partial(stage.partitions.build, cfg, with_upstream, part), **run_options)
    made: dict[str, dict[str, Any]] = {}

    def build(out: Path) -> dict[str, Any]:
        def build_both(upstream_out: Path) -> dict[str, Any]:
            theirs, made["own"] = stage.partitions.fused_build(cfg, {**upstream_dirs, **dirs}, part, upstream_out,
                                                               out)
            return theirs

        store.run(upstream_spec, build_both, force=upstream_force, **run_options)
        if "own" in made:
            return made["own"]
        return stage.partitions.build(cfg, with_upstream, part, out)  # another run built the upstream part

    return store.run(spec, build, force=force, **run_options)


def part_dirs(dirs: Dirs) -> list[Path]:
    """The parts' directories handed to a partitioned stage's merge, in part order."""
    return [dirs[f"part-{i}"] for i in range(sum(name.startswith("part-") for name in dirs))]


def _device(cfg: PipelineConfig) -> str:
    import torch

    if cfg.device != "auto":
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _external(**paths: str) -> dict[str, ExternalInput]:
    """User-supplied checkpoints/files (the word `demo` means a demo-assets output, not an input)."""
    return {name: ExternalInput(path) for name, path in paths.items() if path and path != DEMO}


def _tokenize_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """What of `tokenize` shapes the shards of the vq-codes and tokenize stages (not the fan-out, not speed)."""
    return _without(to_dict(cfg.tokenize), "batch_size", "num_workers", "partitions")


def _tokenizer_inputs(cfg: PipelineConfig) -> dict[str, str]:
    vq, dino = cfg.tokenizers.vqgan, cfg.tokenizers.dinov2
    return _external(vqgan_checkpoint=vq.checkpoint, vqgan_config=vq.config, dinov2=dino.path)


def _tokenizer_config(cfg: PipelineConfig) -> dict[str, Any]:
    """Which tokenizers, not where their files lie (their contents enter the key as input digests)."""
    vq, dino = cfg.tokenizers.vqgan, cfg.tokenizers.dinov2
    return {"vqgan": {"kind": vq.kind, "demo": vq.checkpoint == DEMO},
            "dinov2": {"kind": dino.kind, "layer": dino.layer, "demo": dino.path == DEMO}}


def _tokenizer_paths(cfg: PipelineConfig, dirs: Dirs) -> tuple[Path, Path | None, Path]:
    """(VQGAN checkpoint, taming YAML or None, DINOv2 path), demo ones from the demo-assets artifact."""
    vq, dino = cfg.tokenizers.vqgan, cfg.tokenizers.dinov2
    assets = dirs.get("demo-assets")
    vq_ckpt = assets / DEMO_VQGAN if vq.checkpoint == DEMO else Path(vq.checkpoint)
    dino_path = assets / DEMO_DINOV2 if dino.path == DEMO else Path(dino.path)
    return vq_ckpt, Path(vq.config) if vq.config else None, dino_path


DEMO_VQGAN = "vqgan_maskgit_tiny.ckpt"
DEMO_DINOV2 = "dinov2_tiny_hf"
DEMO_INCEPTION = "inception_random.pth"
DEMO_EXTRACTOR = "demo (random weights)"  # fid.json's `extractor` for the demo's Inception
DEMO_CLIP = "clip_tiny_hf"


RANDOM_TOKENIZERS = "demo tokenizers: random weights — codes carry no meaning"


def random_tokenizers_note(cfg: PipelineConfig) -> str | None:
    """What to say when the demo's random-weight tokenizers tokenize real images (None otherwise): their
    codes say nothing of the images, nor does anything learnt from them."""
    if cfg.uses_demo_data or not cfg.uses_demo_assets:
        return None
    which = [name for name, demo in (("VQGAN", cfg.tokenizers.vqgan.checkpoint == DEMO),
                                     ("DINOv2", cfg.tokenizers.dinov2.path == DEMO)) if demo]
    return f"{RANDOM_TOKENIZERS} ({' and '.join(which)})" if which else None


def build_demo_data(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    from pipeline.demo_data import make_demo_dataset

    d = cfg.demo_data
    make_demo_dataset(out / "images", d.num_classes, d.train_per_class, d.val_per_class, d.image_size, d.seed)
    return {"images": "images", "num_images": d.num_classes * (d.train_per_class + d.val_per_class)}


def build_demo_assets(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    from lease.evaluate.fid import save_random_inception
    from lease.tokenizers import tiny

    a = cfg.tokenizers.demo
    tiny.save_tiny_maskgit_vqgan(out / DEMO_VQGAN, a.seed, n_embed=a.vqgan_codes, ch=a.vqgan_channels,
                                 num_res_blocks=a.vqgan_res_blocks, z_channels=a.vqgan_z_channels)
    tiny.save_tiny_hf_dinov2(out / DEMO_DINOV2, a.seed, hidden_size=a.dino_hidden, depth=a.dino_depth,
                             num_heads=a.dino_heads, registers=a.dino_registers)
    # torch-fidelity's InceptionV3 at random weights in its weights file's format (evaluate.fid.inception: demo)
    save_random_inception(out / DEMO_INCEPTION, a.seed)
    return {"vqgan": DEMO_VQGAN, "dinov2": DEMO_DINOV2, "inception": DEMO_INCEPTION}


def build_demo_clip(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    """The tiny random-weight CLIP of `condgen.clip: demo` (its own stage, so that turning condgen on
    leaves the tokenizers' artifacts, and every tokenization key, as they were)."""
    from lease.tokenizers import tiny

    c = cfg.condgen.demo
    tiny.save_tiny_hf_clip(out / DEMO_CLIP, c.seed, hidden_size=c.hidden_size, layers=c.layers, heads=c.heads,
                           projection_dim=c.projection_dim)
    return {"clip": DEMO_CLIP}


def build_manifest(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    from pipeline import manifest

    source = dirs["demo-data"] / "images" if cfg.uses_demo_data else cfg.data.source
    # absolute: the later stages read these locations from other working directories (and machines)
    summary = manifest.build_manifest(os.path.abspath(source), out / "manifest.parquet", kind=cfg.data.kind,
                                      val_fraction=cfg.data.val_fraction, seed=cfg.data.seed,
                                      num_workers=cfg.data.num_workers, check=cfg.data.check)
    return {"manifest": "manifest.parquet", **_plain(summary)}


MANIFESTS_DIR = Path(__file__).resolve().parents[1] / "data_manifests"


def publish_manifest(cfg: PipelineConfig, out: Path) -> None:
    """`data.manifest_name` set: the manifest also lies at `data_manifests/<name>.parquet`, to commit
    (rewritten only when its content changed, so a cached run leaves the file alone)."""
    if not cfg.data.manifest_name:
        return
    target = MANIFESTS_DIR / f"{cfg.data.manifest_name}.parquet"
    data = (out / "manifest.parquet").read_bytes()
    if not target.is_file() or target.read_bytes() != data:
        atomic_write_bytes(target, data)
        log.info("manifest published as %s", target)


def plan_features(cfg: PipelineConfig, dirs: Dirs, count: int) -> list[dict[str, Any]]:
    from pipeline import tokenize

    return tokenize.feature_sample_parts(dirs["manifest"] / "manifest.parquet", cfg.features.num_images,
                                         cfg.features.seed, count)


def build_features_part(cfg: PipelineConfig, dirs: Dirs, part: dict[str, Any], out: Path) -> dict[str, Any]:
    from pipeline import tokenize

    _, _, dino_path = _tokenizer_paths(cfg, dirs)
    f, dino = cfg.features, cfg.tokenizers.dinov2
    summary = tokenize.sample_features(dirs["manifest"] / "manifest.parquet", out / "features.npy",
                                       dinov2_kind=dino.kind, dinov2_path=dino_path, layer=dino.layer,
                                       num_images=f.num_images, patches_per_image=f.patches_per_image, seed=f.seed,
                                       batch_size=f.batch_size, num_workers=f.num_workers, dtype=f.dtype,
                                       device=_device(cfg), part=tuple(part["images"]))
    return _plain(summary)


def build_features(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    """The feature sample from its parts, concatenated in order: the same file for any number of parts."""
    from pipeline import tokenize

    parts = part_dirs(dirs)
    tokenize.concatenate_feature_parts([part / "features.npy" for part in parts], out / "features.npy")
    results = [_recorded_result(part) for part in parts]
    return {"features": "features.npy", "num_images": sum(r["num_images"] for r in results),
            "patches_per_image": results[0]["patches_per_image"], "dim": results[0]["dim"],
            "dtype": results[0]["dtype"], "layer": results[0]["layer"], "partitions": len(parts)}


def build_kmeans(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    from pipeline import kmeans

    k, device = cfg.kmeans, _device(cfg)
    if k.codebook:
        return kmeans.use_existing_codebook(k.codebook, out, k.num_neighbours, device=device)
    features = kmeans.load_feature_sample(dirs["features"] / "features.npy", k.sample_size, k.seed)
    result = kmeans.train_kmeans(features, k.k, k.iters, k.seed, backend=k.backend, device=device)
    return kmeans.write_kmeans_outputs(result, out, k.num_neighbours, k.iters, k.seed, device)


def plan_tokenize(cfg: PipelineConfig, dirs: Dirs, count: int) -> list[dict[str, Any]]:
    """Whole-shard parts, the same for `vq-codes` and `tokenize` (a fused pass pairs them by rows)."""
    from pipeline import tokenize

    return tokenize.partition_shards(dirs["manifest"] / "manifest.parquet", cfg.tokenize.images_per_shard, count)


def _pass_settings(cfg: PipelineConfig, part: dict[str, Any]) -> dict[str, Any]:
    """The arguments of `pipeline.tokenize.encode_manifest` every pass of these stages shares."""
    t = cfg.tokenize
    return dict(batch_size=t.batch_size, num_workers=t.num_workers, images_per_shard=t.images_per_shard,
                dtype=t.dtype, device=_device(cfg), gpu_decode=t.gpu_decode, compile=t.compile,
                shards=part["shards"])


def _vqgan_settings(cfg: PipelineConfig, dirs: Dirs) -> dict[str, Any]:
    vq_ckpt, vq_config, _ = _tokenizer_paths(cfg, dirs)
    return dict(vqgan_kind=cfg.tokenizers.vqgan.kind, vqgan_checkpoint=vq_ckpt, vqgan_config=vq_config)


def _assign_settings(cfg: PipelineConfig, dirs: Dirs) -> dict[str, Any]:
    _, _, dino_path = _tokenizer_paths(cfg, dirs)
    dino = cfg.tokenizers.dinov2
    return dict(dinov2_kind=dino.kind, dinov2_path=dino_path, layer=dino.layer,
                centroids=dirs["kmeans"] / "centroids.npy")


def build_vq_codes_part(cfg: PipelineConfig, dirs: Dirs, part: dict[str, Any], out: Path) -> dict[str, Any]:
    """The generative codes of one part's shards: the VQGAN alone (no codebook is involved)."""
    from pipeline import tokenize

    return _plain(tokenize.encode_manifest(dirs["manifest"] / "manifest.parquet", {out: ("vq",)},
                                           **_vqgan_settings(cfg, dirs), **_pass_settings(cfg, part)))


def build_tokenize_part(cfg: PipelineConfig, dirs: Dirs, part: dict[str, Any], out: Path) -> dict[str, Any]:
    """One part's token shards from the `vq-codes` shards of the same rows and a DINOv2 + nearest-centroid
    pass (no VQGAN): what a new codebook costs."""
    from pipeline import tokenize

    return _plain(tokenize.encode_manifest(dirs["manifest"] / "manifest.parquet", {out: tokenize.TOKEN_FIELDS},
                                           given=dirs["vq-codes"], **_assign_settings(cfg, dirs),
                                           **_pass_settings(cfg, part)))


def build_fused_part(cfg: PipelineConfig, dirs: Dirs, part: dict[str, Any], vq_out: Path,
                     out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """One part of `vq-codes` and of `tokenize` in one pass (each image decoded once, the VQGAN and DINOv2
    on the same batch): the first run's cost, whose files are those of the two passes apart."""
    from pipeline import tokenize

    summary = _plain(tokenize.encode_manifest(dirs["manifest"] / "manifest.parquet",
                                              {vq_out: ("vq",), out: tokenize.TOKEN_FIELDS},
                                              **_vqgan_settings(cfg, dirs), **_assign_settings(cfg, dirs),
                                              **_pass_settings(cfg, part)))
    return {**summary, "disc_codes": None, "fused_with": "tokenize"}, summary


def release_tokenizers() -> None:
    from pipeline import tokenize

    tokenize.release_cached_tokenizer()


def build_vq_codes(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    """The generative codes from their parts' shards: the same files whatever the number of parts."""
    from pipeline import tokenize

    parts = part_dirs(dirs)
    shards = tokenize.merge_partitions(parts, out)
    results = [_recorded_result(part) for part in parts]
    return {"num_images": results[0]["num_images"], "num_shards": results[0]["num_shards"], "shards": shards,
            "vq_codes": results[0]["vq_codes"], "partitions": len(parts),
            "fused_parts": sum(r.get("fused_with") == "tokenize" for r in results),
            "shards_written": sum(r["shards_written"] for r in results),
            "first_batch_seconds": max(r["first_batch_seconds"] for r in results)}


def build_tokenize(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    """The tokenize artifact from its parts' shards: the same files whatever the number of parts."""
    from pipeline import tokenize

    parts = part_dirs(dirs)
    shards = tokenize.merge_partitions(parts, out)
    results = [_recorded_result(part) for part in parts]
    return {"num_images": results[0]["num_images"], "num_shards": results[0]["num_shards"], "shards": shards,
            "vq_codes": _recorded_result(dirs["vq-codes"])["vq_codes"], "disc_codes": results[0]["disc_codes"],
            "partitions": len(parts), "shards_written": sum(r["shards_written"] for r in results),
            "vqgan_runs": sum("vq" in r["fields"] for r in results),  # parts built by a fused pass
            "first_batch_seconds": max(r["first_batch_seconds"] for r in results)}


def _recorded_result(directory: Path) -> dict[str, Any]:
    """The summary an upstream stage stored in its completion record."""
    return json.loads((directory / RECORD_NAME).read_text())["result"]


def build_pack(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    from pipeline import pack

    tokens = _recorded_result(dirs["tokenize"])
    splits = {split: dirs["tokenize"] / split for split, count in tokens["num_images"].items() if count > 0}
    return pack.pack(splits, out, vocab_gen=tokens["vq_codes"], codebook_size=tokens["disc_codes"],
                     samples_per_shard=cfg.pack.samples_per_shard, seed=cfg.pack.seed,
                     num_workers=cfg.pack.num_workers)


def _pretrain_config(cfg: PipelineConfig, dirs: Dirs | None = None) -> dict[str, Any]:
    """The trainer's config with the data paths of this run filled in (blank for the key). `mage_online`
    reads the manifest's images and the run's VQGAN instead of the packed VQGAN codes."""
    train_cfg = to_dict(cfg.pretrain)
    train_cfg["data"]["shards"] = str(dirs["pack"] / "train") if dirs else ""
    train_cfg["data"]["codebook"] = str(dirs["kmeans"] / "centroids.npy") if dirs else ""
    if _tokenizes_online(cfg):
        online, vq = train_cfg["online"], cfg.tokenizers.vqgan
        online["vqgan_kind"] = vq.kind
        if dirs:
            vq_ckpt, vq_config, _ = _tokenizer_paths(cfg, dirs)
            online.update(manifest=str(dirs["manifest"] / "manifest.parquet"), vqgan_checkpoint=str(vq_ckpt),
                          vqgan_config=str(vq_config or ""))
        else:  # the key: which VQGAN (its files' digests are the stage's inputs), not where it lies
            online.update(manifest="", vqgan_checkpoint="demo" if vq.checkpoint == DEMO else "", vqgan_config="")
    return train_cfg


def _tokenizes_online(cfg: PipelineConfig) -> bool:
    return cfg.pretrain.method == "mage_online"


def _batch_for_data(batch_size: int, train_split: dict[str, Any]) -> int:
    """`batch_size`, or for a small image folder that packs fewer train samples than one batch the
    largest power of two within them, with a warning (powers of two keep the batch divisible by
    `grad_accum`). The stage's key holds the configured size, and stays honest: the sample count is
    fixed by the pack key upstream, so one key always trains with one batch size."""
    samples = int(train_split.get("samples", 0))
    if samples >= batch_size:
        return batch_size
    if samples == 0:
        raise ValueError("the pack stage holds no train samples to pretrain on: check data.source")
    fits = 1 << (samples.bit_length() - 1)  # the largest power of two not above the sample count
    log.warning("pretrain.batch_size=%d is more than the %d train samples of this data: training with batches "
                "of %d", batch_size, samples, fits)
    return fits


def build_pretrain(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    from lease.configs import train_config
    from lease.launch import run_torchrun, runs_distributed
    from lease.stopping import Interrupted
    from lease.train import train

    train_cfg = _pretrain_config(cfg, dirs)
    requested = train_cfg["batch_size"]
    train_cfg["batch_size"] = _batch_for_data(requested, _recorded_result(dirs["pack"])["splits"].get("train", {}))
    # An interrupted run left its checkpoint in this (work) directory: continue it exactly.
    run_cfg, resume = train_config(train_cfg), (out / "checkpoint.pt").is_file()
    result = run_torchrun(run_cfg, out, resume) if runs_distributed(run_cfg) else train(run_cfg, out, resume=resume)
    if not result.get("completed"):  # a stop signal: the trainer saved a checkpoint at that step
        raise Interrupted(f"stopped at step {result['steps']}; its checkpoint is kept, and the next run "
                          "continues from it")
    return {"steps": result["steps"], "checkpoint": "checkpoint.pt", "final": result["final"],
            "batch_size": train_cfg["batch_size"], **({"batch_size_configured": requested}
                                                      if requested != train_cfg["batch_size"] else {})}


def build_evaluate(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    """k-NN on mean-pooled encoder features of the cached tokens (train → val); linear probe and few-shot
    by `evaluate.protocol` (cached tokens, or online-tokenized views of the manifest's images); MaskGIT
    sample and reconstruction/inpainting/outpainting grids (beside the input images) through the VQGAN.
    The report is the `report` stage's."""
    from lease.checkpoints import model_from_checkpoint
    from lease.data import read_token_set
    from lease.evaluate import fewshot, generate, grids, knn, linear_probe, protocols
    from lease.evaluate.features import extract_token_set
    from lease.tokenizers import load_vqgan

    e, device = cfg.evaluate, _device(cfg)
    model = model_from_checkpoint(dirs["pretrain"] / "checkpoint.pt", device)
    train, val = (extract_token_set(model, read_token_set(dirs["pack"] / split), e.batch_size, device=device,
                                    dtype=e.dtype) for split in ("train", "val"))
    results = {}
    if unlabelled_reason := _unlabelled(train[1], val[1]):
        log.warning("evaluate: k-NN, linear probe and few-shot skipped: %s", unlabelled_reason)
    elif e.protocol == "fast":
        results.update(knn=knn.knn_classify(*train, *val, e.knn, device),
                       linear_probe=linear_probe.linear_probe(*train, *val, e.linear_probe, device),
                       fewshot=fewshot.few_shot(*train, *val, e.fewshot, device))
    else:
        results["knn"] = knn.knn_classify(*train, *val, e.knn, device)
        results.update(protocols.online_probes(e.protocol, model, _online_views(cfg, dirs, device), e.linear_probe,
                                               e.fewshot, e.augment, e.dtype))
    results = protocols.labelled(results, e.protocol)
    for name, result in results.items():
        atomic_write_json(out / f"{name}.json", result)

    vq_ckpt, vq_config, _ = _tokenizer_paths(cfg, dirs)
    vqgan = load_vqgan(cfg.tokenizers.vqgan.kind, vq_ckpt, config=vq_config, device=device)
    generate.check_compatible(model, vqgan)
    sampler = generate.MaskGitSampler(model, e.generate, device)
    tokens = sampler.generate()
    decode = functools.partial(_decode_tokens, vqgan, sampler.grid_size, e.generate.dtype, device)
    atomic_write_json(out / FID_RESULT, _fid_result(cfg, dirs, tokens, decode, device))
    shown = tokens[: e.grid_rows * e.grid_rows].to(device)
    images = generate.decode_images(vqgan, shown, sampler.grid_size, e.generate.dtype)
    pictures = {"samples": grids.save_image_grid(images, out / "samples.png", nrow=e.grid_rows)}
    pictures.update(generate._task_grids(sampler, vqgan, str(dirs["pack"] / "val"), e.grid_rows, out,
                                         functools.partial(_input_crops, dirs["manifest"], vqgan.image_size)))
    return {"knn_top1": results.get("knn", {}).get("top1"),
            "linear_probe_top1": results.get("linear_probe", {}).get("top1"),
            "skipped": unlabelled_reason, "grids": sorted(pictures)}


def _unlabelled(train_labels, val_labels) -> str | None:
    """Why the label-needing metrics cannot run (an unlabelled source, the self-supervised case), or None."""
    if not train_labels.numel() or not val_labels.numel():
        return "the train or val split is empty"
    if int(train_labels.min()) < 0 or int(val_labels.min()) < 0:
        return "the source is unlabelled (images without class folders)"
    if int(train_labels.max()) < 1:
        return "the source has a single class"
    return None


FID_RESULT = "fid.json"


def _decode_tokens(vqgan, grid_size: int, dtype: str, device: str, tokens):
    from lease.evaluate.generate import decode_images

    return decode_images(vqgan, tokens.to(device), grid_size, dtype)


def _inception_path(cfg: PipelineConfig, dirs: Dirs) -> Path | None:
    f = cfg.evaluate.fid
    if f.inception == DEMO:
        return dirs["demo-assets"] / DEMO_INCEPTION
    return Path(f.inception) if f.inception else None


def _fid_result(cfg: PipelineConfig, dirs: Dirs, tokens, decode, device: str) -> dict[str, Any]:
    """fid.json (INTERFACES.md): FID / IS of the generated `tokens` (decoded by `decode`) against the
    manifest's val images through torch-fidelity, or with `missing` saying which file to provide."""
    import numpy as np

    from lease.evaluate.fid import DecodedImages, FidConfig, TokenImages, fid_is, weights_needed
    from lease.images import decode_location
    from pipeline.manifest import read_manifest

    f, g = cfg.evaluate.fid, cfg.evaluate.generate
    weights = _inception_path(cfg, dirs)
    result = {"fid": None, "isc": None, "isc_std": None, "samples": int(tokens.shape[0]),
              "extractor": DEMO_EXTRACTOR if f.inception == DEMO else str(weights or ""), "protocol": g.preset,
              "missing": None}
    if weights is None or not weights.is_file():
        where = f" ({weights} does not exist)" if weights else ""
        result["missing"] = (f"FID/IS not computed: provide {weights_needed()} and set evaluate.fid.inception to "
                             f"its path{where}")
        log.warning("%s", result["missing"])
        return result
    locations = read_manifest(dirs["manifest"] / "manifest.parquet", split="val")["location"].to_pylist()
    count = min(f.reference_images or len(locations), len(locations))
    # evenly spaced over the key-sorted split, so a capped reference set still spans the classes
    picked = [locations[i] for i in np.linspace(0, len(locations) - 1, count).round().astype(int)] if count else []
    metrics = fid_is(TokenImages(tokens, decode, uint8=g.uint8), DecodedImages(picked, decode_location, f.image_size),
                     FidConfig(weights=str(weights), image_size=f.image_size, batch_size=f.batch_size,
                               isc_splits=min(f.isc_splits, int(tokens.shape[0])), loader_workers=False,
                               feature_layer=f.feature_layer), device)
    result.update(fid=metrics["fid"], isc=metrics["isc_mean"], isc_std=metrics["isc_std"],
                  reference_images=metrics["num_reference"], feature_layer=f.feature_layer)
    return result


def build_finetune(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    """finetune.json (table 3): the encoder fine-tuned on the manifest's train split, scored on its val
    split; an interrupted run continues from the last epoch's finetune.pt in its work directory."""
    from lease.checkpoints import model_from_checkpoint
    from lease.evaluate import finetune
    from lease.evaluate.knn import num_classes_of
    from lease.evaluate.online import OnlineTokenizer
    from lease.tokenizers import load_vqgan

    f, device = cfg.finetune, _device(cfg)
    aug = dataclasses.replace(f.augment, seed=f.train.seed)
    train, val = finetune.manifest_views(dirs["manifest"] / "manifest.parquet", aug, f.train.seed)
    if reason := _unlabelled(train.labels, val.labels):
        log.warning("finetune: skipped, fine-tuning needs class labels: %s", reason)
        return {"finetune": None, "skipped": reason}
    vq_ckpt, vq_config, _ = _tokenizer_paths(cfg, dirs)
    vqgan = load_vqgan(cfg.tokenizers.vqgan.kind, vq_ckpt, config=vq_config, device=device,
                       compile=device.startswith("cuda"))
    train_cfg = dataclasses.replace(f.train, batch_size=min(f.train.batch_size, len(train) // 2 * 2))
    encoder = model_from_checkpoint(dirs["pretrain"] / "checkpoint.pt", device)
    result = finetune.finetune(encoder, OnlineTokenizer(vqgan, aug.batch_size), train, val,
                               num_classes_of(train.labels, val.labels), train_cfg, aug, out)
    return {"finetune": finetune.RESULT, "top1": result["top1"], "top5": result["top5"], "epochs": result["epochs"],
            "batch_size": train_cfg.batch_size}


# --------------------------------------------------------------- class-conditional generation (§4.4)
def _class_names(cfg: PipelineConfig, dirs: Dirs) -> list[str]:
    """condgen.names (a names file), else the manifest's class folder names by label."""
    from lease.clip_text import read_names_file
    from pipeline.manifest import manifest_classes

    if cfg.condgen.names:
        return read_names_file(cfg.condgen.names)
    names = manifest_classes(dirs["manifest"] / "manifest.parquet")
    if not names:
        raise ConfigError("condgen: the manifest has no class names (a source without class folders): give "
                          "condgen.names, a file of class names one per line in label order")
    return names


def build_class_embeddings(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    from lease.clip_text import class_embeddings, save_class_embeddings

    c = cfg.condgen
    clip = dirs["demo-clip"] / DEMO_CLIP if c.clip == DEMO else Path(c.clip)
    names = _class_names(cfg, dirs)
    emb = class_embeddings(clip, names, c.template)
    save_class_embeddings(out / "class_embeddings.npy", emb.features, names, c.template, emb.key)
    return {"embeddings": "class_embeddings.npy", "classes": len(names), "dim": int(emb.features.shape[1]),
            "key": emb.key}


def _condgen_run(cfg: PipelineConfig, dirs: Dirs | None = None) -> dict[str, Any]:
    """The conditional run's config (`lease.condgen.CondGenConfig` as data), this run's paths filled in
    (blank for the key)."""
    c = cfg.condgen
    train_cfg = to_dict(c.train)
    train_cfg["data"]["shards"] = str(dirs["pack"] / "train") if dirs else ""
    train_cfg["data"]["codebook"] = str(dirs["kmeans"] / "centroids.npy") if dirs else ""
    return {"pretrained": str(dirs["pretrain"] / "checkpoint.pt") if dirs else "",
            "class_embeddings": str(dirs["class-embeddings"] / "class_embeddings.npy") if dirs else "",
            "tail": c.tail, "tail_positions": c.tail_positions, "null_prob": c.null_prob, "train": train_cfg}


def build_condgen(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    from lease.condgen import condgen_config, train_condgen
    from lease.launch import run_torchrun, runs_distributed
    from lease.stopping import Interrupted

    data = _condgen_run(cfg, dirs)
    train_split = _recorded_result(dirs["pack"])["splits"].get("train", {})
    data["train"]["batch_size"] = _batch_for_data(data["train"]["batch_size"], train_split)
    run, resume = condgen_config(data), (out / "checkpoint.pt").is_file()
    classes = _recorded_result(dirs["class-embeddings"])["classes"]
    result = (run_torchrun(run.train, out, resume, module="lease.condgen", config_data=to_dict(run))
              if runs_distributed(run.train) else train_condgen(run, out, resume=resume))
    if not result.get("completed"):
        raise Interrupted(f"stopped at step {result['steps']}; its checkpoint is kept, and the next run "
                          "continues from it")
    return {"steps": result["steps"], "checkpoint": "checkpoint.pt", "export": "export", "final": result["final"],
            "classes": classes, "batch_size": data["train"]["batch_size"]}


def _condgen_fid(cfg: PipelineConfig, dirs: Dirs | None = None):
    """condgen.fid; without its own `weights`, the evaluate stage's Inception (`evaluate.fid.inception`, the
    demo's random one too) at that stage's feature layer, so both tables use one extractor."""
    f = cfg.condgen.fid
    if f.weights or not cfg.evaluate.fid.inception:
        return f
    weights = (_inception_path(cfg, dirs) if dirs else cfg.evaluate.fid.inception) or ""
    return dataclasses.replace(f, weights=str(weights), feature_layer=f.feature_layer or cfg.evaluate.fid.feature_layer)


def _condgen_fid_inputs(cfg: PipelineConfig) -> dict[str, ExternalInput]:
    weights = _condgen_fid(cfg).weights
    present = weights if weights != DEMO and Path(weights).is_file() else ""  # missing: condgen.json says so
    return _external(vqgan_checkpoint=cfg.tokenizers.vqgan.checkpoint, vqgan_config=cfg.tokenizers.vqgan.config,
                     fid_weights=present)


def build_condgen_eval(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    """Class-conditional samples, grids and FID/IS (table 7) into condgen.json (INTERFACES.md)."""

    import torch

    from lease.checkpoints import model_from_checkpoint
    from lease.evaluate.condgen import CondGenEval, evaluate_classes
    from lease.evaluate.fid import DecodedImages
    from lease.data import read_token_set
    from lease.evaluate import generate
    from lease.tokenizers import load_vqgan
    from lease.images import decode_location
    from pipeline.manifest import read_manifest

    c, device = cfg.condgen, _device(cfg)
    model = model_from_checkpoint(dirs["condgen"] / "checkpoint.pt", device)
    vq_ckpt, vq_config, _ = _tokenizer_paths(cfg, dirs)
    vqgan = load_vqgan(cfg.tokenizers.vqgan.kind, vq_ckpt, config=vq_config, device=device)
    generate.check_compatible(model, vqgan)
    gen_cfg = dataclasses.replace(c.generate, batch_size=min(c.generate.batch_size, c.samples_per_class))
    sampler = generate.MaskGitSampler(model, gen_cfg, device)
    train_tokens = read_token_set(dirs["pack"] / "train") if model.tail_proj is not None else None
    val = read_manifest(dirs["manifest"] / "manifest.parquet", split="val")["location"].to_pylist()
    opts = CondGenEval(c.samples_per_class, c.classes, c.sample_tail, c.grid_classes, c.grid_rows)
    result = evaluate_classes(model, sampler, vqgan, train_tokens, DecodedImages(val, decode_location, c.fid.image_size),
                              _condgen_fid(cfg, dirs), opts, out, torch.device(device), weights_key="condgen.fid.weights")
    return {"condgen": "condgen.json", "fid": result["fid"], "isc": result["isc"], "classes": result["classes"],
            "grids": sorted(p.name for p in out.glob("class-*.png"))}


def _input_crops(manifest_dir: Path, size: int, keys: list[str]):
    """uint8 [n, 3, size, size]: the centre crops the tokenize stage encoded for the val samples `keys`,
    decoded again from the manifest's locations by the pipeline's image loader."""
    import torch
    from torchvision.transforms.v2.functional import pil_to_tensor

    from lease.images import both_crops, decode_location
    from pipeline.manifest import read_manifest

    rows = read_manifest(manifest_dir / "manifest.parquet", split="val")
    location = dict(zip(rows["key"].to_pylist(), rows["location"].to_pylist()))
    return torch.stack([both_crops(pil_to_tensor(decode_location(location[key])), [size])[0] for key in keys])


# `evaluate.datasets` and `condgen` are the evaluation-set and conditional-generation sections; read by
# name so that the report stage's dependencies follow them whichever of the sections a checkout has.
def _eval_set_names(cfg: PipelineConfig) -> list[str]:
    """The evaluation sets of the run (`evaluate.datasets`, each its own `eval-<name>` stage)."""
    return [d.name for d in active_datasets(cfg)]


def active_datasets(cfg: PipelineConfig) -> list:
    """`evaluate.datasets` less the generated ones (root: demo) when the images are the user's: those are
    drawn from the demo's own classes, which the user's pretraining data does not have."""
    return [d for d in cfg.evaluate.datasets if d.root != DEMO or cfg.uses_demo_data]


def left_out_datasets_note(cfg: PipelineConfig) -> str | None:
    left_out = [d.name for d in cfg.evaluate.datasets if d not in active_datasets(cfg)]
    return (f"evaluate.datasets: the generated set(s) {', '.join(left_out)} (root: demo) are left out: they "
            "are made from the demo's classes, not your images' (give a root of yours, or evaluate.datasets=[])"
            if left_out else None)


def _condgen_enabled(cfg: PipelineConfig) -> bool:
    """Whether class-conditional generation (`condgen.enabled`, its `condgen-eval` stage) is part of the run."""
    return bool(getattr(getattr(cfg, "condgen", None), "enabled", False))


def _report_after(cfg: PipelineConfig) -> tuple[str, ...]:
    """The report's config-named upstream stages: one per evaluation set, fine-tuning's and conditional
    generation's."""
    return (tuple(f"eval-{name}" for name in _eval_set_names(cfg)) + (("finetune",) if cfg.finetune.enabled else ())
            + (("condgen-eval",) if _condgen_enabled(cfg) else ()))


def _report_config(cfg: PipelineConfig) -> dict[str, Any]:
    """What the report shows beyond its upstream artifacts: the run's name and data in the title, the
    evaluation sets it expects, and the facts that decide whether the paper's numbers are comparable."""
    p = cfg.pretrain
    return {"name": cfg.name, "source": cfg.data.source, "eval_sets": _eval_set_names(cfg),
            "condgen": _condgen_enabled(cfg), "caveat": random_tokenizers_note(cfg),
            "run": {"preset": p.preset, "embed_dim": p.model.embed_dim, "depth": p.model.depth, "method": p.method,
                    "epochs": p.epochs, "max_steps": p.max_steps, "contrast_on": p.model.contrast_on}}


def build_report(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    """The run's report (`lease.evaluate.report`): the paper's tables from the evaluate, evaluation-set and
    conditional-generation results, the codebook statistics and the figures."""
    from lease.evaluate.report import ReportInputs, RunFacts, write_report

    c = _report_config(cfg)
    manifest = _recorded_result(dirs["manifest"])
    facts = RunFacts(name=c["name"], source=c["source"], images=dict(manifest["split_counts"]),
                     classes=len(manifest["class_names"]), model=c["run"]["preset"],
                     **{k: c["run"][k] for k in ("embed_dim", "depth", "method", "epochs", "max_steps", "contrast_on")},
                     caveat=c["caveat"], unlabelled=_recorded_result(dirs["evaluate"]).get("skipped"))
    inputs = ReportInputs(eval_dir=dirs["evaluate"], finetune_dir=dirs.get("finetune"), eval_sets={n: dirs.get(f"eval-{n}") for n in c["eval_sets"]},
                          condgen=c["condgen"], condgen_dir=dirs.get("condgen-eval"),
                          metrics_jsonl=dirs["pretrain"] / "metrics.jsonl", stats_json=dirs["pack"] / "stats.json",
                          token_usage_png=dirs["pack"] / "token_usage.png")
    written = write_report(out, inputs, facts)
    return {"report": written["report"].name, "metrics": written["metrics"].name}


def _online_views(cfg: PipelineConfig, dirs: Dirs, device: str, manifest: Path | None = None):
    """A manifest's (default: the pretraining one's) train (augmented) and val views, decoded by the
    pipeline's image loader, and the run's VQGAN (compiled on CUDA) to tokenize them online."""
    from lease.evaluate.online import AugmentedImages, OnlineTokenizer, view_transform
    from lease.evaluate.protocols import OnlineViews
    from lease.tokenizers import load_vqgan
    from lease.images import decode_location
    from pipeline.manifest import read_manifest

    a = cfg.evaluate.augment
    views = {}
    for split in ("train", "val"):
        rows = read_manifest(manifest or dirs["manifest"] / "manifest.parquet", split=split)
        views[split] = AugmentedImages(rows["location"].to_pylist(), rows["label"].to_pylist(),
                                       view_transform(a, split), decode_location, seed=a.seed)
    vq_ckpt, vq_config, _ = _tokenizer_paths(cfg, dirs)
    vqgan = load_vqgan(cfg.tokenizers.vqgan.kind, vq_ckpt, config=vq_config, device=device,
                       compile=device.startswith("cuda"))
    return OnlineViews(views["train"], views["val"], OnlineTokenizer(vqgan, a.batch_size))


# ------------------------------------------------------------------- evaluation datasets (branches)
# One parametrised set of stages per entry of `evaluate.datasets` (pipeline.evalsets):
#   eval-data-<name> (root: demo) -> eval-manifest-<name> -> eval-tokenize-<name> -> eval-features-<name>
#   -> eval-<name> (result.json); robustness sets share `eval-bank`, the pretraining train features.
# Each has its own keys, so adding a dataset runs only its branch and removing one reruns nothing.

BANK = "eval-bank"
BRANCHES = "eval-*"  # in a stage list (TRAIN_STAGES): where the branches start


def branch_stage(part: str, dataset: str) -> str:
    """The name of a branch's stage: eval-<part>-<dataset>, the final one (`metrics`) eval-<dataset>."""
    return f"eval-{dataset}" if part == "metrics" else f"eval-{part}-{dataset}"


def _dataset(cfg: PipelineConfig, name: str):
    return next(d for d in cfg.evaluate.datasets if d.name == name)


def _dataset_key(cfg: PipelineConfig, name: str) -> str:
    return f"evaluate.datasets[{[d.name for d in cfg.evaluate.datasets].index(name)}]"


def build_eval_data(cfg: PipelineConfig, dirs: Dirs, out: Path, dataset: str) -> dict[str, Any]:
    """A generated evaluation set (root: demo): corrupted pretraining classes, or new classes."""
    from pipeline import demo_data

    d = _dataset(cfg, dataset)
    g = d.demo
    if d.role == "robustness":
        demo_data.make_demo_corruptions(out / "images", cfg.demo_data.num_classes, g.per_class, g.corruptions,
                                        g.severities, g.image_size, g.seed)
    else:
        demo_data.make_demo_transfer(out / "images", g.num_classes, g.per_class, g.val_per_class, g.image_size,
                                     g.seed, first_class=cfg.demo_data.num_classes)
    return {"images": "images"}


def _eval_data_config(cfg: PipelineConfig, name: str) -> dict[str, Any]:
    d = _dataset(cfg, name)
    if d.role == "robustness":
        return {"role": d.role, "classes": cfg.demo_data.num_classes,
                "demo": _without(to_dict(d.demo), "num_classes", "val_per_class")}
    return {"role": d.role, "first_class": cfg.demo_data.num_classes,
            "demo": _without(to_dict(d.demo), "corruptions", "severities")}


def build_eval_manifest(cfg: PipelineConfig, dirs: Dirs, out: Path, dataset: str) -> dict[str, Any]:
    """The set's manifest: a transfer set's ImageFolder as it is; a robustness set's images as a list
    labelled with pretraining class indices (pipeline.evalsets)."""
    from pipeline import evalsets, manifest

    d = _dataset(cfg, dataset)
    root = dirs[branch_stage("data", dataset)] / "images" if d.root == DEMO else Path(d.root)
    common = dict(seed=d.seed, num_workers=cfg.data.num_workers, check=d.check)
    if d.role == "transfer":
        summary = manifest.build_manifest(root, out / "manifest.parquet", kind="imagefolder",
                                          val_fraction=d.val_fraction, **common)
    else:
        classes = manifest.manifest_classes(dirs["manifest"] / "manifest.parquet")
        lines = evalsets.robustness_listing(d, root, classes, _dataset_key(cfg, dataset))
        (out / evalsets.LISTING).write_text("\n".join(lines) + "\n")
        summary = manifest.build_manifest(out / evalsets.LISTING, out / "manifest.parquet", kind="list",
                                          val_fraction=0.0, **common)
    return {"manifest": "manifest.parquet", "root": str(root), **_plain(summary)}


def _eval_manifest_config(cfg: PipelineConfig, name: str) -> dict[str, Any]:
    d = _dataset(cfg, name)
    keep = {"role": d.role, "root": d.root, "layout": d.layout, "seed": d.seed, "check": d.check}
    return keep | ({"class_map": d.class_map} if d.role == "robustness" else {"val_fraction": d.val_fraction})


def build_eval_tokenize(cfg: PipelineConfig, dirs: Dirs, out: Path, dataset: str) -> dict[str, Any]:
    """The set's tokens, by the pretraining run's tokenizers and codebook (the tokenize stage's settings)."""
    vq_ckpt, vq_config, dino_path = _tokenizer_paths(cfg, dirs)
    compiled = _device(cfg).startswith("cuda") and cfg.tokenize.compile != "off"
    # branches build in threads of one process and share its kept tokenizers: compiled ones run one at a time
    with _COMPILED_TOKENIZERS if compiled else contextlib.nullcontext():
        return _plain(_tokenize_branch(cfg, dirs, out, dataset, vq_ckpt, vq_config, dino_path))


_COMPILED_TOKENIZERS = threading.Lock()


def _tokenize_branch(cfg: PipelineConfig, dirs: Dirs, out: Path, dataset: str, vq_ckpt, vq_config, dino_path):
    from pipeline import tokenize

    t, tok = cfg.tokenize, cfg.tokenizers
    return tokenize.tokenize(dirs[branch_stage("manifest", dataset)] / "manifest.parquet",
                             dirs["kmeans"] / "centroids.npy", out, vqgan_kind=tok.vqgan.kind,
                             vqgan_checkpoint=vq_ckpt, vqgan_config=vq_config, dinov2_kind=tok.dinov2.kind,
                             dinov2_path=dino_path, layer=tok.dinov2.layer, batch_size=t.batch_size,
                             num_workers=t.num_workers, images_per_shard=t.images_per_shard, dtype=t.dtype,
                             device=_device(cfg), gpu_decode=t.gpu_decode, compile=t.compile)


def _branch_tokenize_config(cfg: PipelineConfig) -> dict[str, Any]:
    """A branch tokenizes in one pass with both networks: the tokenize stage's settings and both tokenizers."""
    return {"tokenize": _tokenize_settings(cfg), **_tokenizer_config(cfg)}


def _token_splits(directory: Path) -> list[str]:
    return [split for split in ("train", "val") if any((directory / split).glob("shard-*.npz"))]


def build_eval_features(cfg: PipelineConfig, dirs: Dirs, out: Path, dataset: str) -> dict[str, Any]:
    """Mean-pooled encoder features of each split's cached tokens (as the evaluate stage's k-NN)."""
    import torch

    from lease.checkpoints import model_from_checkpoint
    from lease.evaluate.features import extract_features, save_features
    from pipeline.tokenize import read_shards

    e, device = cfg.evaluate, _device(cfg)
    model = model_from_checkpoint(dirs["pretrain"] / "checkpoint.pt", device)
    tokens, counts = dirs[branch_stage("tokenize", dataset)], {}
    for split in _token_splits(tokens):
        shards = read_shards(tokens / split)
        feats = extract_features(model, torch.from_numpy(shards["vq"].astype("int64")), e.batch_size, device=device,
                                 dtype=e.dtype)
        save_features(out / split, feats, torch.from_numpy(shards["labels"]), {"split": split, "pool": "mean"})
        counts[split] = int(feats.shape[0])
    return {"splits": counts}


def build_eval_bank(cfg: PipelineConfig, dirs: Dirs, out: Path) -> dict[str, Any]:
    """The robustness sets' k-NN bank: features of the pretraining train split (packed tokens)."""
    from lease.checkpoints import model_from_checkpoint
    from lease.data import read_token_set
    from lease.evaluate.features import extract_token_set, save_features

    e, device = cfg.evaluate, _device(cfg)
    model = model_from_checkpoint(dirs["pretrain"] / "checkpoint.pt", device)
    feats, labels = extract_token_set(model, read_token_set(dirs["pack"] / "train"), e.batch_size, device=device,
                                      dtype=e.dtype)
    save_features(out / "train", feats, labels, {"split": "train", "pool": "mean"})
    return {"num_train": int(feats.shape[0])}


def build_eval_metrics(cfg: PipelineConfig, dirs: Dirs, out: Path, dataset: str) -> dict[str, Any]:
    """result.json (INTERFACES.md): a robustness set's k-NN against the pretraining bank (per corruption
    and severity too), or a transfer set's k-NN, linear probe and few-shot by `evaluate.protocol`."""
    from lease.evaluate import fewshot, knn, linear_probe, protocols
    from lease.evaluate.features import load_features
    from pipeline import evalsets
    from pipeline.manifest import read_manifest
    from pipeline.tokenize import read_shards

    d, e, device = _dataset(cfg, dataset), cfg.evaluate, _device(cfg)
    features, manifest = dirs[branch_stage("features", dataset)], dirs[branch_stage("manifest", dataset)]
    if d.role == "robustness":
        queries = load_features(features / "train", device)
        rows = read_manifest(manifest / "manifest.parquet", split="train")
        location = dict(zip(rows["key"].to_pylist(), rows["location"].to_pylist()))
        root = Path(_recorded_result(manifest)["root"])
        keys = read_shards(dirs[branch_stage("tokenize", dataset)] / "train")["keys"].tolist()
        groups = [evalsets.group_of(location[key], root, d.layout) for key in keys]
        result = evalsets.robustness_result(d.name, load_features(dirs[BANK] / "train", device), queries, groups,
                                            e.knn, device)
    else:
        train, val = (load_features(features / split, device) for split in ("train", "val"))
        shots = dataclasses.replace(e.fewshot, shots=list(d.fewshot_shots))
        if e.protocol == "fast":
            probe, few = linear_probe.linear_probe(*train, *val, e.linear_probe, device), \
                fewshot.few_shot(*train, *val, shots, device)
        else:
            from lease.checkpoints import model_from_checkpoint

            model = model_from_checkpoint(dirs["pretrain"] / "checkpoint.pt", device)
            views = _online_views(cfg, dirs, device, manifest / "manifest.parquet")
            online = protocols.online_probes(e.protocol, model, views, e.linear_probe, shots, e.augment, e.dtype)
            probe, few = online["linear_probe"], online["fewshot"]
        result = evalsets.transfer_result(d.name, e.protocol, int(train[1].numel() + val[1].numel()),
                                          knn.knn_classify(*train, *val, e.knn, device), probe, few)
    atomic_write_json(out / evalsets.RESULT, result)
    return {"result": evalsets.RESULT, "knn_top1": result["knn_top1"], "linear_probe_top1": result["linear_probe_top1"]}


def _eval_metrics_config(cfg: PipelineConfig, name: str) -> dict[str, Any]:
    d, e = _dataset(cfg, name), cfg.evaluate
    if d.role == "robustness":
        return {"role": d.role, "layout": d.layout, "knn": to_dict(e.knn)}
    return {"role": d.role, "knn": to_dict(e.knn), "protocol": e.protocol, "linear_probe": to_dict(e.linear_probe),
            "fewshot": to_dict(e.fewshot) | {"shots": list(d.fewshot_shots)},
            **({} if e.protocol == "fast" else {"augment": _without(to_dict(e.augment), "batch_size", "num_workers"),
                                                "vqgan": _tokenizer_config(cfg)["vqgan"]})}


def _features_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"pool": "mean", "dtype": cfg.evaluate.dtype}


def dataset_stages(cfg: PipelineConfig) -> list[Stage]:
    """The branch stages of `evaluate.datasets`, in an order where every stage follows its upstream ones."""
    stages = [Stage(BANK, ("pretrain", "pack"), _features_config, build_eval_bank, on_device=True)] \
        if any(d.role == "robustness" for d in active_datasets(cfg)) else []
    for d in active_datasets(cfg):
        name, at = d.name, functools.partial(branch_stage, dataset=d.name)
        bank = (BANK,) if d.role == "robustness" else ()
        stages += [
            Stage(at("data"), (), functools.partial(_eval_data_config, name=name), build_eval_data,
                  enabled=lambda c, demo=d.root == DEMO: demo, dataset=name),
            Stage(at("manifest"), (at("data"), *(("manifest",) if bank else ())),
                  functools.partial(_eval_manifest_config, name=name),
                  build_eval_manifest, inputs=lambda c, root=d.root: {} if root == DEMO else
                  {"root": ExternalInput(root, tree=True)}, dataset=name),
            Stage(at("tokenize"), (at("manifest"), "kmeans", "demo-assets"), _branch_tokenize_config,
                  build_eval_tokenize, inputs=_tokenizer_inputs, on_device=True, dataset=name),
            Stage(at("features"), (at("tokenize"), "pretrain"), _features_config, build_eval_features,
                  on_device=True, dataset=name),
            Stage(at("metrics"), (at("features"), at("manifest"), at("tokenize"), "pretrain", "demo-assets", *bank),
                  functools.partial(_eval_metrics_config, name=name), build_eval_metrics, inputs=_tokenizer_inputs,
                  on_device=True, dataset=name),
        ]
    return stages


def all_stages(cfg: PipelineConfig) -> dict[str, Stage]:
    """Every stage of a config's DAG by name: the fixed ones and its evaluation datasets' branches, in an
    order where each stage follows its upstream ones (the report, which reads every branch, after them)."""
    fixed, branches = list(STAGES.values()), dataset_stages(cfg)
    names = {s.name for s in branches}
    cut = next((i for i, s in enumerate(fixed) if names & set(s.upstream(cfg))), len(fixed))
    return {s.name: s for s in fixed[:cut] + branches + fixed[cut:]}


CONDGEN_EVAL_KEYS = ("samples_per_class", "classes", "sample_tail", "grid_classes", "grid_rows", "generate")


def _plain(summary: Any) -> dict[str, Any]:
    """A stage's return value as JSON-able data for the record."""
    if summary is None:
        return {}
    data = to_dict(summary)
    return data if isinstance(data, dict) else {"result": data}


def _evaluate_inputs(cfg: PipelineConfig) -> dict[str, ExternalInput]:
    """The VQGAN files, and the Inception weights when they exist (a missing file is fid.json's `missing`
    line, not a failure; providing it later changes the key)."""
    inception = cfg.evaluate.fid.inception
    present = inception if inception and inception != DEMO and Path(inception).is_file() else ""
    return _external(vqgan_checkpoint=cfg.tokenizers.vqgan.checkpoint, vqgan_config=cfg.tokenizers.vqgan.config,
                     inception=present)


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("demo-data", (), lambda c: to_dict(c.demo_data), build_demo_data, enabled=lambda c: c.uses_demo_data),
    Stage("demo-assets", (), lambda c: to_dict(c.tokenizers.demo), build_demo_assets,
          enabled=lambda c: c.uses_demo_assets),
    Stage("manifest", ("demo-data",), lambda c: _without(to_dict(c.data), "num_workers", "manifest_name"),
          build_manifest, inputs=lambda c: {} if c.uses_demo_data else {"source": ExternalInput(c.data.source, tree=True)},
          publish=publish_manifest),
    Stage("features", ("manifest", "demo-assets"),
          lambda c: {"features": _without(to_dict(c.features), "batch_size", "num_workers"),
                     "dinov2": _tokenizer_config(c)["dinov2"]}, build_features,
          inputs=lambda c: _external(dinov2=c.tokenizers.dinov2.path),
          enabled=lambda c: not c.kmeans.codebook, on_device=True,
          partitions=Partitions(plan_features, build_features_part)),
    Stage("kmeans", ("features",), lambda c: to_dict(c.kmeans), build_kmeans,
          inputs=lambda c: _external(codebook=c.kmeans.codebook), on_device=True),
    Stage("vq-codes", ("manifest", "demo-assets"),
          lambda c: {"tokenize": _tokenize_settings(c), "vqgan": _tokenizer_config(c)["vqgan"]}, build_vq_codes,
          inputs=lambda c: _external(vqgan_checkpoint=c.tokenizers.vqgan.checkpoint,
                                     vqgan_config=c.tokenizers.vqgan.config), on_device=True,
          partitions=Partitions(plan_tokenize, build_vq_codes_part, release_tokenizers)),
    Stage("tokenize", ("manifest", "kmeans", "demo-assets", "vq-codes"),
          lambda c: {"tokenize": _tokenize_settings(c), "dinov2": _tokenizer_config(c)["dinov2"]}, build_tokenize,
          inputs=lambda c: _external(dinov2=c.tokenizers.dinov2.path), on_device=True,
          partitions=Partitions(plan_tokenize, build_tokenize_part, release_tokenizers, fuses="vq-codes",
                                fused_build=build_fused_part)),
    Stage("pack", ("tokenize",), lambda c: _without(to_dict(c.pack), "num_workers"), build_pack),
    Stage("pretrain", ("pack", "kmeans"),
          lambda c: _without(_pretrain_config(c), "data.num_workers", "log_every", "ckpt_every", "rdzv_endpoint",
                             "online.num_workers"),
          build_pretrain, on_device=True,
          inputs=lambda c: _external(vqgan_checkpoint=c.tokenizers.vqgan.checkpoint,
                                     vqgan_config=c.tokenizers.vqgan.config) if _tokenizes_online(c) else {},
          after_config=lambda c: ("manifest", "demo-assets") if _tokenizes_online(c) else ()),
    Stage("evaluate", ("pretrain", "pack", "manifest", "demo-assets"),
          lambda c: {"evaluate": _without(to_dict(c.evaluate), "batch_size", "augment.batch_size",
                                          "augment.num_workers", "fid.batch_size", "datasets"),
                     "vqgan": _tokenizer_config(c)["vqgan"]},
          build_evaluate, inputs=_evaluate_inputs, on_device=True),
    Stage("finetune", ("pretrain", "manifest", "demo-assets"),
          lambda c: {"train": to_dict(c.finetune.train),
                     "augment": _without(to_dict(c.finetune.augment), "batch_size", "num_workers"),
                     "vqgan": _tokenizer_config(c)["vqgan"]},
          build_finetune, inputs=lambda c: _external(vqgan_checkpoint=c.tokenizers.vqgan.checkpoint,
                                                     vqgan_config=c.tokenizers.vqgan.config),
          enabled=lambda c: c.finetune.enabled, on_device=True),
    Stage("demo-clip", (), lambda c: to_dict(c.condgen.demo), build_demo_clip, enabled=lambda c: c.uses_demo_clip),
    Stage("class-embeddings", ("manifest", "demo-clip"),
          lambda c: {"template": c.condgen.template, "names": "file" if c.condgen.names else "manifest",
                     "clip": "demo" if c.condgen.clip == DEMO else "file"}, build_class_embeddings,
          inputs=lambda c: _external(clip=c.condgen.clip, names=c.condgen.names), enabled=lambda c: c.condgen.enabled),
    Stage("condgen", ("pretrain", "pack", "kmeans", "class-embeddings"),
          lambda c: _without(_condgen_run(c), "train.data.num_workers", "train.log_every", "train.ckpt_every",
                             "train.rdzv_endpoint"),
          build_condgen, enabled=lambda c: c.condgen.enabled, on_device=True),
    Stage("condgen-eval", ("condgen", "pack", "manifest", "demo-assets"),
          lambda c: {"condgen": {k: to_dict(getattr(c.condgen, k)) for k in CONDGEN_EVAL_KEYS},
                     "fid": _without(to_dict(_condgen_fid(c)), "batch_size", "loader_workers", "cache_dir", "weights")
                     | {"demo_inception": _condgen_fid(c).weights == DEMO},
                     "vqgan": _tokenizer_config(c)["vqgan"]},
          build_condgen_eval, inputs=_condgen_fid_inputs,
          enabled=lambda c: c.condgen.enabled, on_device=True),
    Stage("report", ("evaluate", "pretrain", "pack", "manifest"), _report_config, build_report,
          after_config=_report_after),
]}
TOKENIZE_STAGES = ("demo-data", "demo-assets", "manifest", "features", "kmeans", "vq-codes", "tokenize", "pack")
# `BRANCHES` marks where the evaluation datasets' branches start: concurrently with the stages after it
TRAIN_STAGES = ("pretrain", BRANCHES, "evaluate", "finetune", "demo-clip", "class-embeddings", "condgen", "condgen-eval", "report")


PartCall = Callable[[], StageOutcome]  # builds (or finds) one part's artifact


def run_one_by_one(calls: list[PartCall]) -> list[StageOutcome]:
    return [call() for call in calls]


def run_in_process(cfg: PipelineConfig, names: tuple[str, ...], force: bool = False,
                   run_parts: Callable[[list[PartCall]], list[StageOutcome]] = run_one_by_one,
                   workers: int = 1) -> Iterator[StageOutcome]:
    """Run the enabled stages among `names` in order straight through the artifact store, without
    Prefect (benchmarks and tests); yields each stage's outcome as it finishes, its seconds including its
    parts'. A partitioned stage's parts (a fused pair's parts, one pass each) go to `run_parts`: one after
    another by default, or e.g. to a Dask cluster of `workers` workers (the partition count when
    `tokenize.partitions` is 0), the parts' builds being the flow's."""
    store, keys, dirs, stages = ArtifactStore(cfg.artifacts), {}, {}, all_stages(cfg)
    count = cfg.tokenize.partitions or workers

    def merge(stage: Stage, spec: StageSpec, upstream: Dirs, since: float) -> StageOutcome:
        outcome = store.run(spec, stage.builder(cfg, upstream), force=force)
        keys[stage.name], dirs[stage.name] = outcome.key, Path(outcome.path)
        return dataclasses.replace(outcome, seconds=time.perf_counter() - since)

    for stage in (stages[name] for name in expand_branches(cfg, names)):
        if not stage.enabled(cfg) or stage.name in keys:  # in keys: merged right after the stage it fuses
            continue
        t0 = time.perf_counter()
        spec = stage.spec(cfg, keys)
        upstream = {n: dirs[n] for n in stage.upstream(cfg) if n in dirs}
        fusion = None
        if stage.partitions and (force or not store.is_complete(spec)):
            fusion = fusion_for(stage, cfg, spec, keys, dirs, store, set(names) if force else set())
            if fusion is None:
                calls = [functools.partial(store.run, part_spec, stage.builder(cfg, upstream, part), force=force)
                         for part_spec, part in part_specs(stage, cfg, upstream, spec, count)]
                upstream.update({f"part-{i}": Path(built.path) for i, built in enumerate(run_parts(calls))})
            else:  # the pass runs as the fused stage's parts, and its time counts there
                pairs = fused_part_specs(fusion, cfg, upstream, count)
                calls = [functools.partial(run_fused_part, store, cfg, fusion.stage, fusion.dirs, part, part_spec,
                                           theirs, upstream, force=force, upstream_force=force)
                         for (part_spec, part), theirs in pairs]
                own = {f"part-{i}": Path(built.path) for i, built in enumerate(run_parts(calls))}
                upstream.update({f"part-{i}": store.path(theirs.stage, theirs.key)
                                 for i, (_, theirs) in enumerate(pairs)})
                fused_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
            stage.partitions.release()
        yield merge(stage, spec, upstream, t0)
        if fusion is not None:
            outcome = merge(fusion.stage, fusion.spec, {**fusion.dirs, stage.name: dirs[stage.name], **own},
                            time.perf_counter())
            yield dataclasses.replace(outcome, seconds=outcome.seconds + fused_seconds)


def expand_branches(cfg: PipelineConfig, names: tuple[str, ...]) -> list[str]:
    """`names` with `BRANCHES` replaced by every stage of the evaluation datasets' branches."""
    return [n for name in names for n in ([s.name for s in dataset_stages(cfg)] if name == BRANCHES else [name])]


def _without(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """`data` without the dotted `keys` (performance-only settings that do not change a stage's output)."""
    for key in keys:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return data


def with_dependents(cfg: PipelineConfig, names: list[str] | set[str]) -> set[str]:
    """`names` plus every enabled stage downstream of them."""
    stages = all_stages(cfg)
    unknown = sorted(set(names) - set(stages))
    if unknown:
        raise ConfigError(f"force: unknown stage {unknown[0]!r}; stages are: {', '.join(stages)}")
    forced = set(names)
    for stage in stages.values():  # in topological order
        if stage.enabled(cfg) and forced & set(stage.upstream(cfg)):
            forced.add(stage.name)
    return forced
