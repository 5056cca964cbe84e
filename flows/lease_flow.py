"""The Prefect flow `lease` (deployment `full-pipeline`) and its tokenization sub-flow `tokenize`.

Wiring only: the DAG (keys and build functions of each stage) is `pipeline.stages`; each task here is
`pipeline.artifacts.ArtifactStore.run` around a stage's build. The tokenize sub-flow runs the stages up to
`pack`, the `lease` flow then `pretrain` and `evaluate`. A stage's Prefect task cache key is exactly its
artifact key, and the cache policy only offers the key when the artifact on disk is intact: a deleted or
damaged artifact makes Prefect run the task, which rebuilds it (the task itself checks the record too, so
running it outside Prefect is just as safe).
`force` names stages to recompute; their dependents recompute with them.
"""
from __future__ import annotations

import flows  # noqa: F401  (Prefect's environment defaults, before Prefect is imported)

import functools
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NoReturn

from prefect import flow, get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.runtime import flow_run
from prefect.states import Failed, State

from lease.io import CheckpointFileError, atomic_write_json
from lease.typed_config import ConfigError
from pipeline.artifacts import (RECORD_NAME, ArtifactLocked, ArtifactStorageError, ArtifactStore, StageOutcome,
                                StageSpec)
from pipeline.config import PipelineConfig, load_pipeline_config
from pipeline.stages import STAGES, TOKENIZE_STAGES, TRAIN_STAGES, Stage, with_dependents


# ------------------------------------------------------------------------------- Prefect plumbing


@dataclass
class StageJob:
    """A task's input: the stage, its spec (hence key) and where artifacts live."""

    stage: str
    spec: StageSpec
    artifacts: str
    force: bool
    verify: bool
    upstream_dirs: dict[str, str] = field(default_factory=dict)
    wait: bool = True  # for a key another run is building: wait for it (False: fail naming that run)


class ArtifactCachePolicy(CachePolicy):
    """Prefect's cache key for a stage task = the artifact key, offered only while the artifact is intact.

    When the artifact was deleted or damaged (or the stage is forced) there is no key, so Prefect cannot
    answer from its own cache and runs the task, which rebuilds the artifact.
    """

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        job: StageJob = inputs["job"]
        if job.force or not ArtifactStore(job.artifacts).is_complete(job.spec, verify=job.verify):
            return None
        return job.spec.key


# Failures whose message says all a user needs (what is wrong, what to do): the task fails with that
# one line instead of a traceback.
EXPLAINED_FAILURES = (ArtifactStorageError, ArtifactLocked, CheckpointFileError, ConfigError)


def _run_stage(job: StageJob, cfg: PipelineConfig) -> str | State:
    """The task body: reuse or build the artifact; returns "ran" or "cached" (the record holds the rest)."""
    stage = STAGES[job.stage]
    dirs = {name: Path(path) for name, path in job.upstream_dirs.items()}
    try:
        return ArtifactStore(job.artifacts).run(job.spec, lambda out: stage.build(cfg, dirs, out),
                                                force=job.force, verify=job.verify, wait=job.wait).status
    except EXPLAINED_FAILURES as err:
        return Failed(message=str(err))


STAGE_TASKS = {name: task(_run_stage, name=name, cache_policy=ArtifactCachePolicy(), persist_result=True)
               for name in STAGES}


class StageFailed(RuntimeError):
    """A stage failed; `outcomes` holds the table up to and including the failed stage."""

    def __init__(self, message: str, outcomes: list[StageOutcome]):
        super().__init__(message)
        self.outcomes = outcomes


@dataclass
class Runner:
    """Runs the enabled stages in order, collecting outcomes for the stage table."""

    cfg: PipelineConfig
    force: set[str]
    verify: bool = False
    outcomes: dict[str, StageOutcome] = field(default_factory=dict)
    wait: bool = True

    def spec(self, stage: Stage) -> StageSpec:
        return stage.spec(self.cfg, {name: outcome.key for name, outcome in self.outcomes.items()})

    def run(self, names: tuple[str, ...]) -> None:
        for name in names:
            stage = STAGES[name]
            if stage.enabled(self.cfg):
                self.run_one(stage)

    def run_one(self, stage: Stage) -> StageOutcome:
        t0 = time.perf_counter()
        try:
            spec = self.spec(stage)  # digests inputs: a missing checkpoint fails here
        except (OSError, ValueError, ImportError) as err:
            self._fail(stage.name, "", t0, f"cannot compute its key: {err}")
        job = StageJob(stage.name, spec, str(self.artifacts), stage.name in self.force, self.verify,
                       {name: self.outcomes[name].path for name in stage.after if name in self.outcomes},
                       self.wait)
        state = STAGE_TASKS[stage.name](job, self.cfg, return_state=True)
        seconds = time.perf_counter() - t0
        if not state.is_completed():
            self._fail(stage.name, spec.key, t0, state.message)
        # The completion record on disk is the truth, whatever Prefect stored (an older code version's value,
        # or a run on another artifacts root under the same key): read the summary and path from it.
        store = ArtifactStore(self.artifacts)
        record, reason = store.check(spec)
        if record is None:
            self._fail(stage.name, spec.key, t0, f"its artifact is not complete after the run: {reason}")
        status = "cached" if state.name == "Cached" else state.result()
        path = str(store.path(stage.name, spec.key))
        self.outcomes[stage.name] = StageOutcome(stage.name, status, spec.key, seconds, path, record.result)
        return self.outcomes[stage.name]

    def _fail(self, name: str, key: str, t0: float, message: str | None) -> NoReturn:
        self.outcomes[name] = StageOutcome(name, "failed", key, time.perf_counter() - t0, "", {})
        raise StageFailed(f"stage {name} failed: {message}", list(self.outcomes.values()))

    @property
    def artifacts(self) -> Path:
        return Path(self.cfg.artifacts).resolve()


def stage_table(outcomes: list[StageOutcome]) -> str:
    rows = [("stage", "status", "seconds", "key")] + [(o.name, o.status, f"{o.seconds:.1f}", o.key) for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def write_run_record(cfg: PipelineConfig, outcomes: list[StageOutcome], meta: dict[str, Any]) -> Path:
    """`artifacts/runs/<run-id>.json` and `artifacts/runs/latest.json` (same content)."""
    run_id = f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{(flow_run.get_id() or 'local')[:8]}"
    record = {"run_id": run_id, "flow_run_id": flow_run.get_id(), "stages": [o.row() for o in outcomes],
              "artifacts": {o.name: o.path for o in outcomes if o.path}, **meta}
    runs = Path(cfg.artifacts) / "runs"
    atomic_write_json(runs / f"{run_id}.json", record)
    atomic_write_json(runs / "latest.json", record)
    return runs / f"{run_id}.json"


def _run(config: str, overrides: list[str], force: list[str], verify: bool, wait: bool, names: tuple[str, ...],
         prior: list[StageOutcome] | None = None) -> list[StageOutcome]:
    """Validate the config (before any work), then run the enabled stages among `names`."""
    cfg = load_pipeline_config(config, overrides)
    runner = Runner(cfg, with_dependents(cfg, force), verify, {o.name: o for o in prior or []}, wait)
    runner.run(names)
    return list(runner.outcomes.values())


def left_out_note(outcomes: list[StageOutcome], shown: int = 20) -> str:
    """The manifest's excluded images with their reasons, repeated on cached runs too ("" when none)."""
    manifest = next((o for o in outcomes if o.name == "manifest"), None)
    bad = (manifest.result or {}).get("bad", []) if manifest is not None else []
    if not bad:
        return ""
    lines = [f"{len(bad)} image(s) of the source were left out (manifest {manifest.status}; all listed in "
             f"{Path(manifest.path) / RECORD_NAME}):"]
    lines += [f"  {location}: {reason}" for location, reason in bad[:shown]]
    if len(bad) > shown:
        lines.append(f"  ... and {len(bad) - shown} more")
    return "\n".join(lines)


def _finish(flow_name: str, config: str, overrides: list[str], force: list[str], t0: float,
            run: Callable[[], list[StageOutcome]]) -> dict[str, Any] | State:
    """Run, then print the stage table and write the run record, also when a stage failed."""
    status, error, outcomes = "completed", None, []
    try:
        outcomes = run()
    except StageFailed as err:
        status, error, outcomes = "failed", err, err.outcomes
    cfg = load_pipeline_config(config, overrides)
    meta = {"flow": flow_name, "config": config, "overrides": list(overrides), "force": sorted(force),
            "status": status, "seconds": round(time.perf_counter() - t0, 3)}
    try:
        path: Path | str = write_run_record(cfg, outcomes, meta)
    except OSError as err:  # a read-only or full artifacts root: the table still reaches the user
        path = f"run record not written: {err.strerror or err}"
        get_run_logger().warning("cannot write the run record under %s: %s", cfg.artifacts, err)
    get_run_logger().info("stage table (%s):\n%s", path, stage_table(outcomes))
    note = left_out_note(outcomes)
    if note:
        get_run_logger().warning("%s", note)
    if error is not None:  # the flow run fails with the stage's one-line reason (the caller gets FailedRun)
        return Failed(message=str(error))
    return {"stages": [o.row() for o in outcomes], "record": str(path), "outcomes": outcomes}


@flow(name="tokenize", log_prints=False)
def tokenize_flow(config: str = "demo", overrides: list[str] | None = None, force: list[str] | None = None,
                  verify: bool = False, write_record: bool = True, wait: bool = True) -> dict[str, Any] | State:
    """Tokenization alone: (demo data/assets) → manifest → features → k-means → tokenize + assign → pack.

    As a sub-flow of `lease` (`write_record=False`) it returns its outcomes for the parent's table.
    """
    overrides, force, t0 = list(overrides or []), list(force or []), time.perf_counter()
    run = functools.partial(_run, config, overrides, force, verify, wait, TOKENIZE_STAGES)
    if not write_record:
        return {"outcomes": run()}
    return _finish("tokenize", config, overrides, force, t0, run)


@flow(name="lease", log_prints=False)
def lease_flow(config: str = "demo", overrides: list[str] | None = None, force: list[str] | None = None,
               verify: bool = False, wait: bool = True) -> dict[str, Any] | State:
    """The whole pipeline: the `tokenize` sub-flow, then pretraining and evaluation."""
    overrides, force, t0 = list(overrides or []), list(force or []), time.perf_counter()
    load_pipeline_config(config, overrides)  # fail on a bad key before any stage starts

    def run() -> list[StageOutcome]:
        tokenized = tokenize_flow(config, overrides, force, verify, write_record=False, wait=wait)["outcomes"]
        return _run(config, overrides, force, verify, wait, TRAIN_STAGES, prior=tokenized)

    return _finish("lease", config, overrides, force, t0, run)
