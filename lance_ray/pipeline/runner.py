"""Builds and drives one Ray Data pipeline per checkpoint group of a plan.

    read (sources) → prepare_rows (CPU) → LanceWorker pool (GPU) → finish_rows (CPU) → driver counts

Resume: a step's read task leaves out the ids already committed in its output, so a re-run only does
what is missing and a killed run loses at most the batches that were in flight; a step (or a whole
job) whose manifest shows its current input fully committed is not read at all. The driver never
holds the input rows: it sees one small (step, row_id, error) record per row; media never pass
through it.
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

from lance_ray.errors import ClusterError, JobFileError, LanceRayError, RunError
from lance_ray.io import storage
from lance_ray.pipeline import sinks, sources
from lance_ray.pipeline.backends import BACKENDS
from lance_ray.pipeline.metrics import RunMetrics
from lance_ray.pipeline.planner import Group, Plan, PlannedStep, make_plan, runs_side_by_side
from lance_ray.pipeline.progress import StepProgress
from lance_ray.pipeline.report import SUMMARY_FILE
from lance_ray.pipeline.worker import LanceWorker, StepContext, finish_rows, prepare_rows
from lance_ray.spec import Job, Step
from lance_ray.spec.checks import output_path_problems

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)
SUMMARY_PREFIX = "LANCE_RAY_SUMMARY "
CALLS_PER_ACTOR = 4  # batches a GPU actor works on at once (its backend serialises the GPU work itself)
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
    # Without -v, neither Ray Data's error log (a full stack trace per failure) nor the workers' output
    # forwarded to the driver (an actor that cannot load its checkpoint prints its traceback several times
    # over) repeat what the command reports in one line.
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.CRITICAL)
    if ray.is_initialized():
        return
    if not verbose:
        # Ray prints every failed attempt of a task it will retry, remote traceback included, on the
        # driver's stdout; Ray Data retries its actors' calls without end, so one broken actor repeats it.
        os.environ.setdefault("RAY_enable_output_error_log_if_still_retry", "0")
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


def _step_context(job: Job, planned: PlannedStep, on_gpu: bool) -> StepContext:
    step = planned.step
    params = step.params_for(job)
    return StepContext(
        name=step.name,
        task=step.spec,
        params=params,
        settings=step.spec.settings(params),
        output_uri=step.output_path(job),
        sink=sinks.open_sink(step.output_path(job), step.name, step.output.format, step.output.merge_into),
        video_codec=step.output.video_codec,
        turns=tuple(step.turns or ()),
        timeout_s=planned.timeout_s(on_gpu),
        resize_for_model=BACKENDS[job.model_for(step.family).backend].takes_resized_media,
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
        self._sinks: dict[str, sinks.Sink] = {}  # step name -> its sink, opened by _open_step
        self._cancelled = threading.Event()  # set when a group fails: its siblings stop at their next batch
        self._fingerprints: dict[str, str] = {}  # step -> its input's fingerprint, recorded in the manifest

    def run(self, plan: Plan) -> RunSummary:
        """Runs every wave; raises `RunError` (committed rows are kept) when a checkpoint group fails, and
        `OutputLocked` when another run is writing one of the job's outputs."""
        started = time.perf_counter()
        check_outputs(self.job)
        outputs = [step.output_path(self.job) for step in self.job.steps]
        with sinks.locked_outputs(outputs, self.summary.run_id):
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
        contexts = {p.step.name: _step_context(self.job, p, group.gpus_per_actor > 0) for p in group.steps}
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
            for summary in summaries.values():  # a run killed before its manifests gets them now
                self._write_manifest(summary, group)
            return
        ds = self._pipeline(group, datasets, contexts, pending=sum(s.rows - s.skipped for s in summaries.values()))
        if not self._drain(ds, summaries, f"{group.family} [{', '.join(summaries)}]"):
            return  # cancelled: a sibling group failed
        for summary in summaries.values():
            tally = sources.read_tally(self.summary.events_uri, summary.name) if self.summary.events_uri else None
            if tally is not None:  # the exact counts, now that the read task has seen the whole input
                summary.rows, summary.skipped = tally
            self._write_manifest(summary, group)

    def _open_step(self, step: Step, ctx: StepContext) -> tuple[StepSummary, ray.data.Dataset | None]:
        """A step's rows still to do, as a streaming Dataset (None when every row is already committed).

        Nothing is read here: `rows` is the cheap count (exact or estimated), `skipped` the rows its
        output already holds; both become exact from the read task's tally once the step has run.
        """
        job = self.job
        summary = StepSummary(step.name, step.task, ctx.output_uri)
        self._sinks[step.name] = ctx.sink
        if self.overwrite:
            ctx.sink.reset()
        ctx.sink.prepare()  # clean up after killed writers; every committed row held once
        upstream = (
            {step.input.from_step: job.step(step.input.from_step).output_path(job)}
            if step.input.from_step
            else None
        )
        source = sources.open_source(step, job, upstream)
        self._fingerprints[step.name] = fingerprint = source.fingerprint()
        done = sources.complete_manifest(source, ctx.output_uri, retry_failed=self.retry_failed,
                                         fingerprint=fingerprint)
        if done is not None:  # a fully committed step starts no actor
            summary.rows = summary.skipped = int(done.get("rows") or 0)
            return summary, None
        counted = self.row_counts.get(step.name)
        summary.rows = source.estimate_rows().rows if counted is None else counted
        if not ctx.sink.is_empty():  # counted in a Ray task: the ids never reach the driver
            summary.skipped = min(sources.committed_count(ctx.sink, retry_failed=self.retry_failed), summary.rows)
        return summary, sources.to_dataset(source, ctx.sink, retry_failed=self.retry_failed,
                                           events_uri=self.summary.events_uri)

    def _pipeline(self, group: Group, datasets: list, contexts: dict[str, StepContext], pending: int):
        """read → prepare (CPU) → LanceWorker pool (GPU) → finish (CPU), as one lazy Dataset."""
        from ray.data import ActorPoolStrategy

        batch_sizes = {planned.step.name: planned.batch_size for planned in group.steps}
        ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        # Sources yield rows as they read them; Ray Data's default 128 MiB blocks would hold the first
        # rows back until that much input is read (~500k rows). 4 MiB blocks let them flow within a
        # second, and keep the block count low: Ray Data keeps a few KB of statistics in the driver
        # for every block an operator outputs, for the whole run.
        ds.context.target_max_block_size = PIPELINE_BLOCK_BYTES
        # Ray Data hands each actor whole blocks: a small step read as one block would keep every GPU
        # but one idle. Re-blocking by rows is streaming (no barrier) and costs little: rows here are
        # only prompts and URIs.
        ds = ds.repartition(target_num_rows_per_block=_block_rows(pending, max(batch_sizes.values()), group.actors))
        # Distinct CPU requests keep Ray Data from fusing the CPU stages into the GPU actor. A prepare
        # call has a fixed cost (~0.3 ms), so image rows go 32 at a time (~0.26 ms of CPU a row for tiny
        # JPEGs, against 0.4 ms 2 at a time); video rows a few at a time (a 49-frame 480p clip is 60 MB).
        ds = ds.map_batches(prepare_rows, fn_kwargs={"steps": contexts}, batch_format="pyarrow",
                            batch_size=2 if group.family == "video" else 32, num_cpus=0.5)
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
            # Several batches in flight per actor, run by concurrent calls: while one batch's rows decode,
            # the next ones are already in the actor and join the decode engine as slots free up.
            compute=ActorPoolStrategy(size=group.actors, max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                                      enable_true_multi_threading=True),
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
        """Settle the step's output (each row once, for every reader), then write its manifest."""
        self._sinks[summary.name].commit(
            {
                "step": summary.name,
                "task": summary.task,
                "job": self.job.name,
                "run_id": self.summary.run_id,
                "rows": summary.rows,
                "ok_this_run": summary.ok,
                "failed_this_run": summary.failed,
                "skipped": summary.skipped,
                sources.FINGERPRINT_KEY: self._fingerprints.get(summary.name),
                "model": self.job.model_for(group.family).model_dump(mode="json"),
                "finished_at": datetime.now(timezone.utc).isoformat(),
            },
        )


def check_outputs(job: Job) -> None:
    """The output rules of `validate`, again on the job as it runs (`--output` may have moved the outputs)."""
    problems = [storage.output_location_problem(step.output_path(job)) for step in job.steps]
    messages = [p for p in problems if p] + [p.message for p in output_path_problems(job)]
    if messages:
        raise JobFileError("\n".join(dict.fromkeys(messages)))


PIPELINE_BLOCK_BYTES = 4 * 1024 * 1024


def _block_rows(rows: int, batch_size: int, actors: int) -> int:
    """Rows per block: at least four blocks per actor for a small step, at most four batches a block."""
    return max(1, min(-(-rows // (4 * actors)), 4 * batch_size))


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def count_rows(job: Job) -> dict[str, int | None]:
    """Rows per step for the plan, counted cheaply (`StepSource.estimate_rows`: exact where cheap);
    steps fed by another step are unknown until it has run."""
    return {name: None if count is None else count.rows for name, count in count_step_rows(job).items()}


def count_step_rows(job: Job) -> dict[str, sources.RowCount | None]:
    """Like `count_rows`, saying which counts are estimates (large remote tables)."""
    return {
        step.name: (None if step.input.from_step else sources.open_source(step, job).estimate_rows())
        for step in job.steps
    }


def completed_run(job: Job, *, retry_failed: bool = False, run_id: str | None = None) -> RunSummary | None:
    """The summary of a run with nothing to do, when every step's manifest shows its current input fully
    committed (`sources.completed_steps`); checked without Ray and without reading a row."""
    manifests = sources.completed_steps(job, retry_failed=retry_failed)
    if manifests is None:
        return None
    summary = RunSummary(job=job.name, run_id=run_id or new_run_id())
    for step in job.steps:
        rows = int(manifests[step.name].get("rows") or 0)
        summary.steps.append(StepSummary(step.name, step.task, step.output_path(job), rows=rows, skipped=rows))
    return summary


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
    exports Prometheus metrics on `metrics_port` when given). A run with nothing to do (every step's input
    already committed) returns at once, without Ray.
    """
    check_outputs(job)  # before Ray starts: `--output` may have moved the outputs somewhere they cannot be
    if not overwrite and (done := completed_run(job, retry_failed=retry_failed, run_id=run_id)) is not None:
        log.warning("every row of every step is already committed: nothing to run")
        return done
    check_local_models(job)
    init_ray(address or job.ray.address, verbose, metrics_port)
    row_counts = count_rows(job)
    plan = make_plan(job, cluster_gpu_count(), row_counts)
    runner = JobRunner(job, overwrite=overwrite, retry_failed=retry_failed, progress=progress, run_id=run_id,
                       row_counts=row_counts)
    try:
        summary = runner.run(plan)
    except Exception as exc:
        # A read task found the input unusable mid-run (a repeated id): Ray wraps the error with the
        # task's traceback. Say what was wrong, and that the run (not the job file) failed.
        cause = getattr(exc, "cause", None)
        if isinstance(cause, sources.SourceError):
            message = str(cause).splitlines()[0]  # Ray Data appends its retry advice on later lines
            raise RunError(f"{message} (rows committed before it are kept)") from None
        raise
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
