"""Builds and drives one Ray Data pipeline per checkpoint group of a plan.

    read (sources) → prepare_rows (CPU) → LanceWorker pool (GPU) → finish_rows (CPU) → driver counts

Resume: before a step is read, the ids already committed in its output are excluded, so a re-run
only does what is missing and a killed run loses at most the batches that were in flight. The
driver only sees one small (step, row_id, error) record per row; media never pass through it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from lance_ray.errors import ClusterError, LanceRayError, RunError
from lance_ray.io import storage
from lance_ray.pipeline import sinks, sources
from lance_ray.pipeline.metrics import RunMetrics
from lance_ray.pipeline.planner import Group, Plan, make_plan, runs_side_by_side
from lance_ray.pipeline.progress import StepProgress
from lance_ray.pipeline.report import SUMMARY_FILE
from lance_ray.pipeline.worker import LanceWorker, StepContext, finish_rows, prepare_rows
from lance_ray.spec import Job, Step

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)
SUMMARY_PREFIX = "LANCE_RAY_SUMMARY "
SAMPLE_ERRORS = 3  # distinct error messages kept per step for the summary


@dataclass
class StepSummary:
    name: str
    task: str
    output: str
    rows: int = 0  # rows in the input
    skipped: int = 0  # already committed by an earlier run
    ok: int = 0
    failed: int = 0
    elapsed_s: float = 0.0  # from the start of its group's pipeline to its own last committed row
    sample_errors: dict[str, str] = field(default_factory=dict)  # error -> first row with it (SAMPLE_ERRORS)

    @property
    def throughput(self) -> float:
        done = self.ok + self.failed
        return done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def add_error(self, row_id: str, error: str) -> None:
        if len(self.sample_errors) < SAMPLE_ERRORS:
            self.sample_errors.setdefault(error, row_id)


@dataclass
class RunSummary:
    job: str
    run_id: str
    steps: list[StepSummary] = field(default_factory=list)
    elapsed_s: float = 0.0
    events_uri: str | None = None  # <output>/_runs/<run id>: load-*.json of each actor, summary.json
    finished_at: str | None = None

    @property
    def failed(self) -> int:
        return sum(step.failed for step in self.steps)

    def order_steps(self, names: list[str]) -> None:
        """Puts the steps in `names` order (the job file's), whatever order their groups ran in."""
        self.steps.sort(key=lambda step: names.index(step.name))

    def to_json(self) -> str:
        data = asdict(self)
        data["failed"] = self.failed
        return json.dumps(data, sort_keys=True)


def init_ray(address: str | None, verbose: bool = False, metrics_port: int | None = None) -> None:
    """Connects to `address` (or $RAY_ADDRESS, as set inside a Ray job), else starts a local Ray whose
    node exports Prometheus metrics on `metrics_port` when given.

    Unless `verbose`, Ray's own log lines stay in its log files: its loggers only pass errors, worker
    output is not forwarded, and Ray Data shows no progress bars of its own (ours replace them).
    A start or connection that fails is tried once more, then explained.
    """
    import ray
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    where = address or os.environ.get("RAY_ADDRESS")
    if where:
        def start() -> None:
            ray.init(address=address, **quiet)

        failures: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    else:
        def start() -> None:
            # Logical CPUs above the core count keep GPU-less actors from starving the CPU stages.
            ray.init(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False,
                     _metrics_export_port=metrics_port, **quiet)

        failures = (Exception,)  # a local start fails in many ways (most often a timeout on a busy machine)
    for attempt in (1, 2):
        try:
            start()
            return
        except failures as exc:
            ray.shutdown()  # whatever half of it started
            if attempt == 1:
                log.warning("Ray did not start (%s: %s); trying once more", type(exc).__name__, exc)
                continue
            if where:
                raise ClusterError(f"cannot connect to the Ray cluster at {where}: {exc} (is it running? "
                                   "`ray status --address ...` on the head tells)") from exc
            raise RunError(f"could not start a local Ray, twice: {type(exc).__name__}: {exc}. On a busy "
                           "machine Ray's processes can miss their start-up deadline: try again when it is "
                           "less loaded. `lance-ray -v run ...` shows Ray's own messages; its logs are "
                           "in /tmp/ray/session_latest/logs.") from exc


def shutdown_ray() -> None:
    """Stops the local Ray this process started (a connection to a cluster is only closed)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def cluster_gpu_count() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def _step_context(job: Job, step: Step) -> StepContext:
    params = step.params_for(job)
    return StepContext(
        name=step.name,
        task=step.spec,
        params=params,
        settings=step.spec.settings(params),
        output_uri=step.output_path(job),
        video_codec=step.output.video_codec,
        turns=tuple(step.turns or ()),
    )


class JobRunner:
    """Runs a job's plan wave by wave; groups of a wave share the cluster when there are GPUs for all."""

    def __init__(self, job: Job, *, overwrite: bool = False, retry_failed: bool = False, progress: bool = True,
                 run_id: str | None = None, row_counts: dict[str, int | None] | None = None):
        self.job = job
        self.row_counts = row_counts or {}  # exact counts already taken for the plan (None: count at run time)
        self.overwrite = overwrite
        self.retry_failed = retry_failed
        self.progress = progress
        self.summary = RunSummary(job=job.name, run_id=run_id or new_run_id())
        self.summary.events_uri = storage.join_uri(job.output, "_runs", self.summary.run_id)
        self._lock = threading.Lock()
        self._cancelled = threading.Event()  # set when a group fails: its siblings stop at their next batch

    def run(self, plan: Plan) -> RunSummary:
        """Runs every wave; raises `RunError` (committed rows are kept) when a checkpoint group fails."""
        started = time.perf_counter()
        for wave in plan.waves:
            if runs_side_by_side(wave, plan.cluster_gpus) and len(wave.groups) > 1:
                self._run_side_by_side(wave.groups)
            else:
                for group in wave.groups:
                    self.run_group(group)
        self.summary.elapsed_s = round(time.perf_counter() - started, 3)
        return self.summary

    def _run_side_by_side(self, groups: list[Group]) -> None:
        """One thread per group. The first group that fails cancels the others, and its error is raised
        here, in the caller's thread (an exception in a thread would otherwise be lost)."""
        errors: dict[str, BaseException] = {}

        def target(group: Group) -> None:
            try:
                self.run_group(group)
            except BaseException as exc:  # handed to the caller below
                errors[group.family] = exc
                self._cancelled.set()

        threads = [threading.Thread(target=target, args=(g,), name=f"group-{g.family}") for g in groups]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            family, exc = next(iter(errors.items()))
            if isinstance(exc, LanceRayError):
                raise exc
            raise RunError(f"checkpoint group {family} failed: {type(exc).__name__}: {exc}") from exc

    def run_group(self, group: Group) -> None:
        """One checkpoint group: open each step's rows (minus those already committed), run them through
        one Ray Data pipeline, count what comes back, then write each step's manifest."""
        contexts = {planned.step.name: _step_context(self.job, planned.step) for planned in group.steps}
        summaries: dict[str, StepSummary] = {}
        datasets = []
        for planned in group.steps:
            summary, dataset = self._open_step(planned.step, contexts[planned.step.name])
            summaries[planned.step.name] = summary
            if dataset is not None:
                datasets.append(dataset)
        with self._lock:
            self.summary.steps.extend(summaries.values())
        if not datasets:
            log.info("group %s: every row already committed, nothing to run", group.family)
            return
        ds = self._pipeline(group, datasets, contexts, pending=sum(s.rows - s.skipped for s in summaries.values()))
        if not self._drain(ds, summaries, f"{group.family} [{', '.join(summaries)}]"):
            return  # cancelled: a sibling group failed
        for summary in summaries.values():
            self._write_manifest(summary, group)

    def _open_step(self, step: Step, ctx: StepContext) -> tuple[StepSummary, ray.data.Dataset | None]:
        """A step's rows still to do, as a Dataset (None when every row is already committed)."""
        job = self.job
        summary = StepSummary(step.name, step.task, ctx.output_uri)
        if self.overwrite:
            sinks.reset(ctx.output_uri)
        if storage.remove_stale_temp_files(ctx.output_uri):
            log.info("%s: removed partial files of an interrupted run", ctx.output_uri)
        upstream = (
            {step.input.from_step: job.step(step.input.from_step).output_path(job)}
            if step.input.from_step
            else None
        )
        source = sources.open_source(step, job, upstream)
        # Failed rows count as done unless asked to retry them; a retried row's newest part wins.
        committed = sinks.committed_row_ids(ctx.output_uri, include_errors=not self.retry_failed)
        if committed:  # only a resumed step needs its ids in the driver
            row_ids = [row["row_id"] for row in source.iter_rows()]
            summary.rows = len(row_ids)
            summary.skipped = sum(1 for row_id in row_ids if row_id in committed)
        else:
            counted = self.row_counts.get(step.name)
            summary.rows = source.count() if counted is None else counted
        if summary.rows <= summary.skipped:  # a fully committed step starts no actor
            return summary, None
        return summary, source.to_dataset(exclude_row_ids=committed)

    def _pipeline(self, group: Group, datasets: list, contexts: dict[str, StepContext], pending: int):
        """read → prepare (CPU) → LanceWorker pool (GPU) → finish (CPU), as one lazy Dataset."""
        from ray.data import ActorPoolStrategy

        batch_sizes = {planned.step.name: planned.batch_size for planned in group.steps}
        ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        # Ray Data hands each actor whole blocks: a small step read as one block would keep every GPU
        # but one idle. Rows here are only prompts and URIs, so re-blocking them costs little.
        ds = ds.repartition(_block_count(pending, max(batch_sizes.values()), group.actors))
        # Distinct CPU requests keep Ray Data from fusing the CPU stages into the GPU actor.
        ds = ds.map_batches(prepare_rows, fn_kwargs={"steps": contexts}, batch_format="pyarrow", batch_size=2,
                            num_cpus=0.5)
        ds = ds.map_batches(
            LanceWorker,
            fn_constructor_kwargs={
                "model": self.job.model_for(group.family),
                "family": group.family,
                "steps": contexts,
                "batch_sizes": batch_sizes,
                "events_uri": self.summary.events_uri,
            },
            batch_format="pyarrow",
            batch_size=max(batch_sizes.values()),
            compute=ActorPoolStrategy(size=group.actors),
            num_gpus=group.gpus_per_actor,
            num_cpus=1,
        )
        return ds.map_batches(
            finish_rows, fn_kwargs={"steps": contexts}, batch_format="pyarrow", batch_size=None, num_cpus=0.5
        )

    def _drain(self, ds, summaries: dict[str, StepSummary], label: str) -> bool:
        """Pull the committed (step, row_id, error) records through the pipeline, counting them per step (with
        each step's own time and a few of its errors) for the summary, the progress display and the metrics;
        False when the run was cancelled on the way."""
        started = time.perf_counter()
        pending = {name: s.rows - s.skipped for name, s in summaries.items()}
        progress = StepProgress(pending, enabled=self.progress)
        run_metrics = RunMetrics(self.job.name, {name: s.task for name, s in summaries.items()}, pending)
        log.info("%s: %d row(s) to run", label, sum(pending.values()))
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if self._cancelled.is_set():  # a sibling group failed: closing the iterator stops Ray Data
                    return False
                committed: dict[str, list[int]] = {}  # step -> [ok, failed] in this batch
                for step_name, row_id, error in zip(batch.column("step").to_pylist(),
                                                    batch.column("row_id").to_pylist(),
                                                    batch.column("error").to_pylist(), strict=True):
                    summary = summaries[step_name]
                    counts = committed.setdefault(step_name, [0, 0])
                    if error is None:
                        summary.ok += 1
                        counts[0] += 1
                    else:
                        summary.failed += 1
                        summary.add_error(row_id, error)
                        counts[1] += 1
                for step_name, (ok, failed) in committed.items():
                    summary = summaries[step_name]
                    summary.elapsed_s = round(time.perf_counter() - started, 3)
                    done = summary.ok + summary.failed
                    progress.add(step_name, ok, failed)
                    run_metrics.committed(step_name, ok, failed, done, pending[step_name] - done)
        finally:
            progress.close()
        return True

    def _write_manifest(self, summary: StepSummary, group: Group) -> None:
        sinks.write_manifest(
            summary.output,
            {
                "step": summary.name,
                "task": summary.task,
                "job": self.job.name,
                "run_id": self.summary.run_id,
                "rows": summary.rows,
                "ok_this_run": summary.ok,
                "failed_this_run": summary.failed,
                "skipped": summary.skipped,
                "model": self.job.model_for(group.family).model_dump(mode="json"),
                "finished_at": datetime.now(timezone.utc).isoformat(),
            },
        )


def _block_count(rows: int, batch_size: int, actors: int) -> int:
    """Enough blocks of about one batch each that every actor has work, capped to keep blocks useful."""
    return max(1, min(-(-rows // batch_size), max(4 * actors, 64)))


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def count_rows(job: Job) -> dict[str, int | None]:
    """Rows per step for the plan; steps fed by another step are unknown until it has run."""
    return {
        step.name: (None if step.input.from_step else sources.open_source(step, job).count())
        for step in job.steps
    }


def run_job(
    job: Job,
    *,
    address: str | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    run_id: str | None = None,
    verbose: bool = False,
    metrics_port: int | None = None,
) -> RunSummary:
    """Plans and runs a job on Ray; returns per-step counts. Rows that failed are in the outputs with `error`.

    The Ray cluster: `address`, else the job file's `ray.address`, else $RAY_ADDRESS, else a local Ray (which
    exports Prometheus metrics on `metrics_port` when given).
    """
    check_local_models(job)
    init_ray(address or job.ray.address, verbose, metrics_port)
    row_counts = count_rows(job)
    plan = make_plan(job, cluster_gpu_count(), row_counts)
    runner = JobRunner(job, overwrite=overwrite, retry_failed=retry_failed, progress=progress, run_id=run_id,
                       row_counts=row_counts)
    summary = runner.run(plan)
    summary.order_steps([step.name for step in job.steps])
    summary.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    storage.write_bytes_atomic(storage.join_uri(summary.events_uri, SUMMARY_FILE), summary.to_json().encode())
    return summary


def check_local_models(job: Job) -> None:
    """A local checkpoint directory that is not one fails here, in the driver, before Ray starts any actor.

    (Hub and s3:// sources are fetched by the actors, once per node.)
    """
    from lance_ray.models.lance import resolve_checkpoint

    for family in sorted({step.family for step in job.steps}):
        model = job.model_for(family)
        if model.backend == "lance" and model.kind == "local":
            resolve_checkpoint(model.source, family)


def format_summary(summary: RunSummary) -> str:
    """The table `lance-ray run` prints: steps in job file order, each with its own rows/s and time (from its
    group's start to its last committed row), then a few error messages of each step with failed rows."""
    header = f"{'step':<24} {'task':<11} {'rows':>7} {'ok':>7} {'failed':>7} {'skipped':>8} {'rows/s':>8} {'time':>8}"
    lines = [header, "-" * len(header)]
    for step in summary.steps:
        lines.append(
            f"{step.name:<24} {step.task:<11} {step.rows:>7} {step.ok:>7} {step.failed:>7} "
            f"{step.skipped:>8} {step.throughput:>8.2f} {step.elapsed_s:>7.1f}s"
        )
    lines.append(
        f"run {summary.run_id}: {summary.elapsed_s:.1f}s, "
        f"{sum(s.ok for s in summary.steps)} ok, {summary.failed} failed"
    )
    for step in summary.steps:
        if step.failed:
            more = len(step.sample_errors) < step.failed
            lines.append(f"{step.name}: {step.failed} row(s) failed{', for example' if more else ''}:")
            lines.extend(f"  {row_id}: {_one_line(error)}" for error, row_id in step.sample_errors.items())
    return "\n".join(lines)


def _one_line(error: str, limit: int = 300) -> str:
    text = " ".join(error.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
