"""The Prefect flow `lease` (deployment `full-pipeline`) and its tokenization sub-flow `tokenize`.

Wiring only: the DAG (keys and build functions of each stage) is `pipeline.stages`; each task here is
`pipeline.artifacts.ArtifactStore.run` around a stage's build. The tokenize sub-flow runs the stages up to
`pack`, the `lease` flow then `pretrain`, `evaluate` and `report` (with `condgen.enabled` also
`class-embeddings`, `condgen` and `condgen-eval`: `TRAIN_STAGES`), and the branches of `evaluate.datasets`
(one set of stages per dataset), submitted to the flow's task runner once `pretrain` is done, so that they
run concurrently with each other and with `evaluate`; the report waits for them. The flow posts the report
(markdown), its metrics and the stage table (tables) as Prefect artifacts, so the UI shows them. A stage's
Prefect task cache key is exactly its
artifact key, and the cache policy only offers the key when the artifact on disk is intact: a deleted or
damaged artifact makes Prefect run the task, which rebuilds it (the task itself checks the record too, so
running it outside Prefect is just as safe).
`force` names stages to recompute; their dependents recompute with them.
"""
from __future__ import annotations

import flows  # noqa: F401  (Prefect's environment defaults, before Prefect is imported)

import dataclasses
import contextlib
import functools
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NoReturn

import httpx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import CachePolicy
from prefect.runtime import flow_run
from prefect.states import Failed, State

from flows import RESULT_LINE
from flows.runners import part_runner
from lease import stopping
from lease.io import CheckpointFileError, atomic_write_json
from lease.typed_config import ConfigError
from pipeline.artifacts import (RECORD_NAME, ArtifactLocked, ArtifactStorageError, ArtifactStore, StageOutcome,
                                StageSpec)
from pipeline.config import PipelineConfig, load_pipeline_config
from pipeline.stages import (BRANCHES, PART_SUFFIX, STAGES, TOKENIZE_STAGES, TRAIN_STAGES, Fusion, Stage, all_stages,
                             dataset_stages, fused_part_specs, fusion_for, left_out_datasets_note, part_specs,
                             random_tokenizers_note, run_fused_part, with_dependents)


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
    restart: bool = False  # discard what an interrupted run of the stage left instead of continuing it
    part: dict[str, Any] | None = None  # one part of a partitioned stage (its spec is the part's)
    companion: "StageJob | None" = None  # the same rows' part of the stage this one fuses, built in one pass


class ArtifactCachePolicy(CachePolicy):
    """Prefect's cache key for a stage task = the artifact key, offered only while the artifact is intact.

    When the artifact was deleted or damaged (or the stage is forced) there is no key, so Prefect cannot
    answer from its own cache and runs the task, which rebuilds the artifact.
    """

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        job: StageJob = inputs["job"]
        store = ArtifactStore(job.artifacts)
        for one in (job, job.companion) if job.companion else (job,):
            if one.force or not store.is_complete(one.spec, verify=one.verify):
                return None
        return job.spec.key


# Failures whose message says all a user needs (what is wrong, what to do): the task fails with that
# one line instead of a traceback.
EXPLAINED_FAILURES = (ArtifactStorageError, ArtifactLocked, CheckpointFileError, ConfigError)


def _run_stage(job: StageJob, cfg: PipelineConfig) -> str | State:
    """The task body: reuse or build the artifact; returns "ran" or "cached" (the record holds the rest)."""
    stage = all_stages(cfg)[job.stage]
    dirs = {name: Path(path) for name, path in job.upstream_dirs.items()}
    build = stage.builder(cfg, dirs, job.part)
    store = ArtifactStore(job.artifacts)
    build = _naming_final_paths(build, store.path(job.spec.stage, job.spec.key))
    options = dict(verify=job.verify, wait=job.wait, restart=job.restart)
    try:
        if job.companion is not None:  # this part and the fused stage's part of the same rows, one pass
            other = job.companion
            return run_fused_part(store, cfg, stage, dirs, job.part, job.spec, other.spec,
                                  {name: Path(path) for name, path in other.upstream_dirs.items()},
                                  force=job.force, upstream_force=other.force, **options).status
        return store.run(job.spec, build, force=job.force, **options).status
    except EXPLAINED_FAILURES as err:
        return Failed(message=str(err))
    except KeyboardInterrupt as err:  # a stop signal (lease.stopping): what the stage finished stays
        stopping.interrupt_taken()
        return Failed(message=str(err) or "interrupted: the work it finished is kept, and the next run "
                                          "continues from it")


_FINAL_PATHS: dict[str, str] = {}  # work directory -> the directory it is published as, of stages building now
_FINAL_PATHS_LOCK = threading.Lock()
_PLAIN_RECORDS: list[Callable[..., logging.LogRecord]] = []  # the record factory before the first was installed


def _record_naming_final(*args, **kwargs) -> logging.LogRecord:
    record = _PLAIN_RECORDS[0](*args, **kwargs)
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a malformed call: logging reports it as usual
        return record
    for work, final in list(_FINAL_PATHS.items()):
        if work in message:
            message = message.replace(work, final)
            record.msg, record.args = message, ()
    return record


@contextlib.contextmanager
def _logs_name_final_paths(work: Path, final: Path):
    """While a stage builds in its work directory (`<key>.partial-...`), the lines it logs name the
    directory the work is published as, which is where the user will find it. One factory serves every
    stage building at once (branch stages run in threads of their own)."""
    with _FINAL_PATHS_LOCK:
        if not _FINAL_PATHS:
            _PLAIN_RECORDS[:] = [logging.getLogRecordFactory()]
            logging.setLogRecordFactory(_record_naming_final)
        _FINAL_PATHS[str(work)] = str(final)
    try:
        yield
    finally:
        with _FINAL_PATHS_LOCK:
            _FINAL_PATHS.pop(str(work), None)
            if not _FINAL_PATHS:
                logging.setLogRecordFactory(_PLAIN_RECORDS[0])


def _naming_final_paths(build: Callable[[Path], dict[str, Any]], final: Path) -> Callable[[Path], dict[str, Any]]:
    def build_in(work: Path) -> dict[str, Any]:
        with _logs_name_final_paths(work, final):
            return build(work)

    return build_in


STAGE_TASKS = {name: task(_run_stage, name=name, cache_policy=ArtifactCachePolicy(), persist_result=True)
               for name in STAGES}


def stage_task(name: str):
    """The Prefect task of a stage; a branch stage's is made the first time its name is seen."""
    if name not in STAGE_TASKS:
        STAGE_TASKS[name] = task(_run_stage, name=name, cache_policy=ArtifactCachePolicy(), persist_result=True)
    return STAGE_TASKS[name]
PART_TASKS = {name: task(_run_stage, name=name + PART_SUFFIX, cache_policy=ArtifactCachePolicy(), persist_result=True)
              for name, stage in STAGES.items() if stage.partitions}


class StageFailed(RuntimeError):
    """A stage failed, or was interrupted by a stop signal; `outcomes` holds the table up to and including
    that stage, `forced` whether this run forced it."""

    def __init__(self, message: str, outcomes: list[StageOutcome], stage: str, interrupted: bool, forced: bool):
        super().__init__(message)
        self.outcomes, self.stage, self.interrupted, self.forced = outcomes, stage, interrupted, forced


@dataclass
class Runner:
    """Runs the enabled stages in order, collecting outcomes for the stage table."""

    cfg: PipelineConfig
    force: set[str]
    verify: bool = False
    outcomes: dict[str, StageOutcome] = field(default_factory=dict)
    wait: bool = True
    restart: bool = False

    branches: dict[str, "BranchRun"] = field(default_factory=dict)  # submitted branch stages by name

    def spec(self, stage: Stage) -> StageSpec:
        keys = {name: outcome.key for name, outcome in self.outcomes.items()}
        keys.update({name: run.job.spec.key for name, run in self.branches.items()})
        return stage.spec(self.cfg, keys)

    def run(self, names: tuple[str, ...]) -> None:
        """The stages `names` in order; at `BRANCHES` the evaluation datasets' branches are submitted, and
        they are waited for before a stage that needs them, or at the end."""
        try:
            for name in names:
                if name == BRANCHES:
                    self.start_branches()
                    continue
                stage = STAGES[name]
                if not stage.enabled(self.cfg) or name in self.outcomes:  # done: built with the stage it fuses
                    continue
                if stopping.requested() is not None:  # a stop signal whose interrupt some code swallowed
                    self._fail(name, "", time.perf_counter(), "not started: the run was asked to stop")
                if set(stage.upstream(self.cfg)) & set(self.branches):  # it reads branches' results
                    self.finish_branches()
                self.run_one(stage)
        except BaseException:  # the branches still finish (their work is kept); the first failure is reported
            with contextlib.suppress(StageFailed):
                self.finish_branches()
            raise
        self.finish_branches()

    def start_branches(self) -> None:
        """Submit every enabled branch stage to the flow's task runner at once, each waiting for the
        futures of its upstream branch stages: branches run concurrently, each in its own order."""
        store, t0 = ArtifactStore(self.artifacts), time.perf_counter()
        for stage in dataset_stages(self.cfg):
            if not stage.enabled(self.cfg):
                continue
            try:
                spec = self.spec(stage)
            except (OSError, ValueError, ImportError) as err:
                self._fail(stage.name, "", t0, f"cannot compute its key: {err}")
            upstream = {name: self.outcomes[name].path for name in stage.after if name in self.outcomes}
            upstream.update({name: str(store.path(name, run.job.spec.key)) for name, run in self.branches.items()
                             if name in stage.after})
            job = StageJob(stage.name, spec, str(self.artifacts), stage.name in self.force, self.verify, upstream,
                           self.wait, restart=self.restart)
            after = [self.branches[name] for name in stage.after if name in self.branches]
            run = BranchRun(job, time.perf_counter(), after)
            run.future = stage_task(stage.name).submit(job, self.cfg, wait_for=[b.future for b in after])
            run.future.add_done_callback(run.finished)
            self.branches[stage.name] = run

    def finish_branches(self) -> None:
        """Wait for the submitted branch stages; their outcomes join the table in submission order. A
        failed one fails the run (after the others finished); its downstream stages did not start."""
        pending = [(name, run) for name, run in self.branches.items() if name not in self.outcomes]
        failures = []
        for name, run in pending:
            run.future.wait()
            state = run.future.state
            if state.is_completed():
                self.outcomes[name] = self._outcome(name, run.job.spec, state, run.seconds)
                continue
            status = "skipped" if state.name == "NotReady" else "interrupted" if stopping.requested() else "failed"
            self.outcomes[name] = StageOutcome(name, status, run.job.spec.key, run.seconds, "", {})
            if status != "skipped":
                failures.append((name, f"stage {name} {status}: {state.message}"))
        if failures:
            (first, message), more = failures[0], len(failures) - 1
            raise StageFailed(message + (f" (and {more} more failed)" if more else ""), list(self.outcomes.values()),
                              first, stopping.requested() is not None, first in self.force)

    def _outcome(self, name: str, spec: StageSpec, state: State, seconds: float) -> StageOutcome:
        """The outcome from the completion record on disk (the truth, whatever Prefect stored)."""
        store = ArtifactStore(self.artifacts)
        record, reason = store.check(spec)
        if record is None:
            self._fail(name, spec.key, time.perf_counter() - seconds,
                       f"its artifact is not complete after the run: {reason}")
        status = "cached" if state.name == "Cached" else state.result()
        return StageOutcome(name, status, spec.key, seconds, str(store.path(name, spec.key)), record.result)

    def run_one(self, stage: Stage) -> StageOutcome:
        t0 = time.perf_counter()
        try:
            spec = self.spec(stage)  # digests inputs: a missing checkpoint fails here
        except (OSError, ValueError, ImportError) as err:
            self._fail(stage.name, "", t0, f"cannot compute its key: {err}")
        job = StageJob(stage.name, spec, str(self.artifacts), stage.name in self.force, self.verify,
                       {name: self.outcomes[name].path for name in stage.upstream(self.cfg) if name in self.outcomes},
                       self.wait, restart=self.restart)
        if stage.partitions and (job.force or not ArtifactStore(self.artifacts).is_complete(spec)):
            fusion = fusion_for(stage, self.cfg, spec, {name: o.key for name, o in self.outcomes.items()},
                                {name: Path(o.path) for name, o in self.outcomes.items()},
                                ArtifactStore(self.artifacts), self.force)
            if fusion is not None:
                return self.run_fused(job, fusion, t0)
            job.upstream_dirs.update(self.run_parts(stage, job, t0)[0])
        return self.finish(stage, job, t0)

    def run_fused(self, job: StageJob, fusion: Fusion, t0: float) -> StageOutcome:
        """`job`'s stage and the stage that fuses it, whose part tasks build both stages' parts in one pass;
        then both merges, in DAG order (the pass's time counts for the fusing stage)."""
        fused = StageJob(fusion.stage.name, fusion.spec, job.artifacts, fusion.stage.name in self.force, self.verify,
                         {name: str(path) for name, path in fusion.dirs.items()}, self.wait, restart=self.restart)
        own, theirs = self.run_parts(fusion.stage, fused, t0, fusion=fusion, fused_with=job)
        job.upstream_dirs.update(theirs)
        upstream = self.finish(fusion.upstream, job, time.perf_counter())
        fused.upstream_dirs.update(own, **{fusion.upstream.name: upstream.path})
        return self.finish(fusion.stage, fused, t0)

    def finish(self, stage: Stage, job: StageJob, t0: float) -> StageOutcome:
        """The stage's own task (a partitioned stage's merge of its parts), checked against its record."""
        spec = job.spec
        state = STAGE_TASKS[stage.name](job, self.cfg, return_state=True)
        seconds = time.perf_counter() - t0
        if not state.is_completed():
            self._fail(stage.name, spec.key, t0, state.message)
        # The completion record on disk is the truth, whatever Prefect stored (an older code version's value,
        # or a run on another artifacts root under the same key): read the summary and path from it.
        self.outcomes[stage.name] = self._outcome(stage.name, spec, state, seconds)
        if stage.publish:
            stage.publish(self.cfg, Path(self.outcomes[stage.name].path))
        return self.outcomes[stage.name]

    def run_parts(self, stage: Stage, job: StageJob, t0: float, fusion: Fusion | None = None,
                  fused_with: StageJob | None = None) -> tuple[dict[str, str], dict[str, str]]:
        """Build a partitioned stage's parts on the runner's workers (with `fusion`, each task also builds
        the fused stage's part of the same rows, `fused_with` being that stage's job); returns the parts'
        directories by name, the stage's and the fused stage's."""
        upstream = {name: Path(path) for name, path in job.upstream_dirs.items()}
        with part_runner(self.cfg) as (runner, workers):
            count = self.cfg.tokenize.partitions or workers
            if fusion is None:
                jobs = [dataclasses.replace(job, spec=part_spec, part=part)
                        for part_spec, part in part_specs(stage, self.cfg, upstream, job.spec, count)]
            else:
                their_dirs = {name: Path(path) for name, path in fused_with.upstream_dirs.items()}
                jobs = [dataclasses.replace(job, spec=part_spec, part=part,
                                            companion=dataclasses.replace(fused_with, spec=theirs, part=part))
                        for (part_spec, part), theirs in fused_part_specs(fusion, self.cfg, their_dirs, count)]
            also = f" (each also building its {fusion.upstream.name} part in the same pass)" if fusion else ""
            get_run_logger().info("%s: %d parts on %s%s", stage.name, len(jobs),
                                  f"{workers} Dask workers" if runner else "this process", also)
            if runner is None:
                states = [PART_TASKS[stage.name](part_job, self.cfg, return_state=True) for part_job in jobs]
                stage.partitions.release()
            else:
                futures = [runner.submit(PART_TASKS[stage.name], {"job": part_job, "cfg": self.cfg})
                           for part_job in jobs]
                states = [future.wait() or future.state for future in futures]
        failed = [state for state in states if not state.is_completed()]
        if failed:
            self._fail(stage.name, job.spec.key, t0, f"{len(failed)} of {len(jobs)} parts failed: {failed[0].message}")
        store = ArtifactStore(self.artifacts)
        return ({f"part-{i}": str(store.path(part.spec.stage, part.spec.key)) for i, part in enumerate(jobs)},
                {f"part-{i}": str(store.path(part.companion.spec.stage, part.companion.spec.key))
                 for i, part in enumerate(jobs) if part.companion})

    def _fail(self, name: str, key: str, t0: float, message: str | None) -> NoReturn:
        interrupted = stopping.requested() is not None
        status = "interrupted" if interrupted else "failed"
        self.outcomes[name] = StageOutcome(name, status, key, time.perf_counter() - t0, "", {})
        raise StageFailed(f"stage {name} {status}: {message}", list(self.outcomes.values()), name, interrupted,
                          name in self.force)

    @property
    def artifacts(self) -> Path:
        return Path(self.cfg.artifacts).resolve()


@dataclass
class BranchRun:
    """A branch stage submitted to the task runner: its job, future, and when it could start and ended."""

    job: StageJob
    submitted: float
    after: list["BranchRun"]
    future: Any = None
    ended: float | None = None

    def finished(self, _future: Any) -> None:
        self.ended = time.perf_counter()

    @property
    def seconds(self) -> float:
        """From when its upstream branch stages were done (or it was submitted) to its end."""
        start = max([self.submitted] + [b.ended or b.submitted for b in self.after])
        return max((self.ended or time.perf_counter()) - start, 0.0)


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


def _run(config: str, overrides: list[str], force: list[str], verify: bool, wait: bool, restart: bool,
         names: tuple[str, ...], prior: list[StageOutcome] | None = None) -> list[StageOutcome]:
    """Validate the config (before any work), then run the enabled stages among `names`."""
    cfg = load_pipeline_config(config, overrides)
    runner = Runner(cfg, with_dependents(cfg, force), verify, {o.name: o for o in prior or []}, wait, restart)
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
    try:
        post_artifacts(cfg, outcomes, path)
    except httpx.HTTPError as err:  # the UI's copy is lost; the run's result and files stand
        get_run_logger().warning("Prefect artifacts not posted: %s", err)
    note = left_out_note(outcomes)
    if note:
        get_run_logger().warning("%s", note)
    warn_of_caveats(cfg)  # again at the end, where a reader looks for the result
    if error is not None:  # the flow run fails with the stage's one-line reason; the caller gets `error`
        return Failed(message=str(error), data=error)
    summary = run_summary(outcomes, path)
    # The flow's last line is its result, in every run's log (the UI's, a served or worker's run's output);
    # `lease run` leaves this record out of its console and prints the line as its own last (pipeline.cli).
    get_run_logger().info("%s", summary, extra={RESULT_LINE: True})
    return {"stages": [o.row() for o in outcomes], "record": str(path), "outcomes": outcomes, "summary": summary}


def artifact_key(cfg: PipelineConfig, what: str) -> str:
    """A Prefect artifact key (lower-case letters, digits, dashes) for the run's `what`: one per config name, so
    the UI lists each run's latest report, metrics and stage table under stable keys."""
    return f"{re.sub(r'[^a-z0-9]+', '-', cfg.name.lower()).strip('-') or 'lease'}-{what}"


def post_artifacts(cfg: PipelineConfig, outcomes: list[StageOutcome], record: Path | str) -> None:
    """The stage table, and (when the report stage finished) the report and its metrics, as Prefect artifacts
    of this flow run."""
    create_table_artifact(table=[o.row() for o in outcomes], key=artifact_key(cfg, "stages"),
                          description=f"stages of run {cfg.name} (record: {record})")
    report = next((o for o in outcomes if o.name == "report" and o.path and o.status in ("ran", "cached")), None)
    if report is None:
        return
    directory = Path(report.path)
    try:
        text = (directory / report.result["report"]).read_text()
        metrics = json.loads((directory / report.result["metrics"]).read_text())
    except (OSError, KeyError, json.JSONDecodeError) as err:  # the run's result stands; the UI lacks the report
        get_run_logger().warning("report artifacts not posted: %s", err)
        return
    # The UI cannot load the report's relative image links: each figure becomes its file's path.
    text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", lambda m: f"*figure: `{directory / m[2]}`*", text)
    create_markdown_artifact(markdown=f"Report file: `{directory / report.result['report']}`\n\n{text}",
                             key=artifact_key(cfg, "report"), description=f"evaluation report of run {cfg.name}")
    create_table_artifact(table=metrics, key=artifact_key(cfg, "metrics"),
                          description=f"every number of the report of run {cfg.name}, beside the paper's")


def warn_of_caveats(cfg: PipelineConfig) -> None:
    """The run's honesty notes: random-weight demo tokenizers, and generated evaluation sets left out."""
    note = random_tokenizers_note(cfg)
    if note:
        get_run_logger().warning("%s (tokenizers.vqgan.checkpoint / tokenizers.dinov2.path name the real ones)",
                                 note.upper())
    left_out = left_out_datasets_note(cfg)
    if left_out:
        get_run_logger().warning("%s", left_out)


def run_summary(outcomes: list[StageOutcome], record: Path | str) -> str:
    """The run's result in one line: where its report is, or (tokenization alone) its packed shards."""
    done = {o.name: o for o in outcomes}
    if "report" in done:
        return f"report: {Path(done['report'].path) / done['report'].result['report']}"
    return f"packed shards: {done['pack'].path} (every stage's artifact: {record})"


@flow(name="tokenize", log_prints=False)
def tokenize_flow(config: str = "demo", overrides: list[str] | None = None, force: list[str] | None = None,
                  verify: bool = False, write_record: bool = True, wait: bool = True,
                  restart: bool = False) -> dict[str, Any] | State:
    """Tokenization alone: (demo data/assets) → manifest → features → k-means → vq-codes → tokenize → pack.

    As a sub-flow of `lease` (`write_record=False`) it returns its outcomes for the parent's table.
    `restart`: stages that run discard what an interrupted run of them left (default: continue it).
    """
    overrides, force, t0 = list(overrides or []), list(force or []), time.perf_counter()
    run = functools.partial(_run, config, overrides, force, verify, wait, restart, TOKENIZE_STAGES)
    if not write_record:  # a failed stage fails the sub-flow with its one line, the parent prints the table
        try:
            return {"outcomes": run()}
        except StageFailed as err:
            return Failed(message=str(err), data=err)
    warn_of_caveats(load_pipeline_config(config, overrides))
    return _finish("tokenize", config, overrides, force, t0, run)


@flow(name="lease", log_prints=False)
def lease_flow(config: str = "demo", overrides: list[str] | None = None, force: list[str] | None = None,
               verify: bool = False, wait: bool = True, restart: bool = False) -> dict[str, Any] | State:
    """The whole pipeline: the `tokenize` sub-flow, then pretraining, evaluation (with `condgen.enabled`
    also the class-conditional decoder and its evaluation) and the report."""
    overrides, force, t0 = list(overrides or []), list(force or []), time.perf_counter()
    warn_of_caveats(load_pipeline_config(config, overrides))  # a bad key fails here, before any stage

    def run() -> list[StageOutcome]:
        tokenized = tokenize_flow(config, overrides, force, verify, write_record=False, wait=wait,
                                  restart=restart)["outcomes"]
        return _run(config, overrides, force, verify, wait, restart, TRAIN_STAGES, prior=tokenized)

    return _finish("lease", config, overrides, force, t0, run)
