"""Cron schedules for job files: which runs are due, catch-up and overlap policy, SQLite run history.

This is the library behind `lance-ray schedule` (lance_ray/cli/schedule.py). A job file opts in
with `schedule: {cron, timezone, overlap, catch_up}`. Each due run is submitted through the Ray
Jobs API (remote.py) with `--run-date`/`--run-id`, so output paths using `{run_date}` or
`{run_id}` get one partition per run. Errors are `lance_ray.errors` types (ScheduleError is a
JobFileError); state changes are printed only to the `out` stream a Scheduler is given.

Cron times are wall-clock times in the schedule's time zone. Across daylight-saving changes every
matching wall-clock time runs exactly once: a time the clock skips (spring forward) runs at the
moment of the jump, a time the clock repeats (fall back) runs at its first occurrence.

Crash safety: a run is written to the history as QUEUED, with a submission id derived from the job
name and the scheduled time, before it is submitted. After a crash the scheduler asks the cluster
about that id before submitting again, and the cluster refuses a second job with the same id, so a
scheduled time is never run twice.

Two schedulers on one history (a shared volume, where the CLI's file lock does not hold) stay
correct: due times are recorded in one `BEGIN IMMEDIATE` transaction that also reads the cursor, so
each is recorded once; a submission the cluster refuses because the other scheduler made it first is
adopted, not marked failed.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Protocol, TextIO
from zoneinfo import ZoneInfo

from croniter import croniter

from lance_ray.cluster.remote import ClusterUnreachable, RunInfo, SubmitOptions
from lance_ray.errors import ClusterError, JobFileError, LanceRayError
from lance_ray.spec import ScheduleSpec

log = logging.getLogger(__name__)

# History statuses. QUEUED: due, not yet accepted by the cluster. PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED
# mirror Ray's job statuses. MISSED: due while the scheduler was down and dropped by the catch-up policy.
# SKIPPED: due while an earlier run was unfinished, with `overlap: skip`. SUBMIT_FAILED: the cluster
# refused the submission. LOST: the cluster no longer knows the submission (e.g. it was restarted).
QUEUED = "QUEUED"
ON_CLUSTER = ("PENDING", "RUNNING")
UNFINISHED = (QUEUED, *ON_CLUSTER)

# A catch-up after a long outage of a frequent schedule keeps at most this many of the newest due times.
MAX_DUE_PER_TICK = 1000


class ScheduleError(JobFileError):
    """Job files that cannot be scheduled (no `schedule:` block, two jobs with one name)."""


class Clock(Protocol):
    def now(self) -> datetime: ...  # timezone-aware

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def sleep(self, seconds: float) -> None:
        import time

        time.sleep(seconds)


class Cluster(Protocol):
    """What the scheduler needs from a Ray cluster; remote.RemoteCluster is the real one."""

    def submit(
        self,
        job_path: str | Path,
        options: SubmitOptions,
        *,
        submission_id: str | None = None,
        run_date: str | None = None,
        run_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> str: ...

    def info(self, submission_id: str) -> RunInfo | None: ...


def wall_to_utc(wall: datetime, zone: ZoneInfo) -> datetime:
    """The UTC instant at which the naive wall-clock time `wall` happens in `zone`.

    Repeated times (fall back) give their first occurrence. Skipped times (spring forward) give the
    instant of the jump: the first second whose offset is the post-jump one.
    """
    first = wall.replace(tzinfo=zone, fold=0).astimezone(timezone.utc)
    if first.astimezone(zone).replace(tzinfo=None) == wall:
        return first
    # `wall` lies in a gap. Read with the post-jump offset it lands before the jump, read with the
    # pre-jump offset after it; bisect the seconds in between for the jump.
    after_offset = first.astimezone(zone).utcoffset()
    lo = int(wall.replace(tzinfo=zone, fold=1).astimezone(timezone.utc).timestamp())
    hi = int(first.timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, zone).utcoffset() == after_offset:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, timezone.utc)


def _instants(schedule: ScheduleSpec, after: datetime) -> Iterator[datetime]:
    """The schedule's instants strictly after `after`, in order, each once, as UTC datetimes."""
    zone = ZoneInfo(schedule.timezone)
    # Wall-clock times map to instants monotonically (see wall_to_utc), so walking the cron over
    # naive local times from `after`'s wall-clock time sees every match in order.
    it = croniter(schedule.cron, after.astimezone(zone).replace(tzinfo=None))
    previous = after
    while True:
        instant = wall_to_utc(it.get_next(datetime), zone)
        if instant > previous:  # skipped wall times all land on the jump: keep one
            previous = instant
            yield instant


def due_times(
    schedule: ScheduleSpec, after: datetime, until: datetime, limit: int = MAX_DUE_PER_TICK
) -> list[datetime]:
    """Scheduled instants in (after, until], oldest first (at most the newest `limit`)."""
    return list(deque(itertools.takewhile(lambda t: t <= until, _instants(schedule, after)), maxlen=limit))


def next_after(schedule: ScheduleSpec, moment: datetime) -> datetime:
    """The first scheduled instant strictly after `moment`."""
    return next(_instants(schedule, moment))


def latest_due(schedule: ScheduleSpec, moment: datetime) -> datetime:
    """The newest scheduled instant at or before `moment`: the run that a Kubernetes CronJob firing now
    stands for (`lance-ray submit --scheduled`)."""
    zone = ZoneInfo(schedule.timezone)
    # One minute past `moment` so that a time due exactly now counts; walk back over wall-clock times.
    it = croniter(schedule.cron, (moment + timedelta(minutes=1)).astimezone(zone).replace(tzinfo=None))
    while True:
        instant = wall_to_utc(it.get_prev(datetime), zone)
        if instant <= moment:
            return instant


def run_date_for(schedule: ScheduleSpec, scheduled_for: datetime) -> str:
    """The `{run_date}` of a run: its scheduled day in the schedule's time zone."""
    return scheduled_for.astimezone(ZoneInfo(schedule.timezone)).date().isoformat()


def run_id_for(scheduled_for: datetime) -> str:
    """The `{run_id}` of a scheduled run: its UTC instant, unique per job and safe in paths."""
    return scheduled_for.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def submission_id_for(job_name: str, scheduled_for: datetime) -> str:
    return f"lance-ray-{job_name}-{run_id_for(scheduled_for)}"


@dataclass
class Run:
    """One row of the run history."""

    job: str
    scheduled_for: datetime
    status: str
    submission_id: str | None = None
    rows_ok: int | None = None
    rows_failed: int | None = None
    error: str | None = None
    updated_at: datetime | None = None


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


class RunHistory:
    """Run history and per-job cursors in one SQLite file.

    The cursor of a job is the instant up to which its due times have been turned into history rows;
    both change in one transaction, so a crash never leaves a due time half-recorded.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions below
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS runs (
                job TEXT NOT NULL,
                scheduled_for TEXT NOT NULL,
                status TEXT NOT NULL,
                submission_id TEXT,
                rows_ok INTEGER,
                rows_failed INTEGER,
                error TEXT,
                updated_at TEXT NOT NULL,
                PRIMARY KEY (job, scheduled_for)
            );
            CREATE TABLE IF NOT EXISTS cursors (job TEXT PRIMARY KEY, checked_until TEXT NOT NULL);
        """)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def cursor(self, job: str) -> datetime | None:
        row = self._db.execute("SELECT checked_until FROM cursors WHERE job = ?", (job,)).fetchone()
        return datetime.fromisoformat(row[0]) if row else None

    def set_cursor(self, job: str, moment: datetime) -> None:
        self._db.execute(
            "INSERT INTO cursors (job, checked_until) VALUES (?, ?) "
            "ON CONFLICT(job) DO UPDATE SET checked_until = excluded.checked_until",
            (job, _iso(moment)),
        )

    def add(self, run: Run, now: datetime) -> None:
        self._db.execute(
            "INSERT INTO runs (job, scheduled_for, status, submission_id, rows_ok, rows_failed, error, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run.job,
                _iso(run.scheduled_for),
                run.status,
                run.submission_id,
                run.rows_ok,
                run.rows_failed,
                run.error,
                _iso(now),
            ),
        )

    def update(self, run: Run, now: datetime) -> None:
        self._db.execute(
            "UPDATE runs SET status = ?, submission_id = ?, rows_ok = ?, rows_failed = ?, error = ?, updated_at = ? "
            "WHERE job = ? AND scheduled_for = ?",
            (
                run.status,
                run.submission_id,
                run.rows_ok,
                run.rows_failed,
                run.error,
                _iso(now),
                run.job,
                _iso(run.scheduled_for),
            ),
        )

    def runs(self, job: str | None = None, statuses: Sequence[str] | None = None) -> list[Run]:
        """History rows, oldest scheduled time first."""
        query, params = "SELECT * FROM runs WHERE 1 = 1", []
        if job is not None:
            query += " AND job = ?"
            params.append(job)
        if statuses is not None:
            query += f" AND status IN ({', '.join('?' * len(statuses))})"
            params.extend(statuses)
        rows = self._db.execute(query + " ORDER BY scheduled_for, job", params).fetchall()
        return [
            Run(
                job=r[0],
                scheduled_for=datetime.fromisoformat(r[1]),
                status=r[2],
                submission_id=r[3],
                rows_ok=r[4],
                rows_failed=r[5],
                error=r[6],
                updated_at=datetime.fromisoformat(r[7]),
            )
            for r in rows
        ]


@dataclass(frozen=True)
class ScheduledJob:
    name: str
    path: Path
    schedule: ScheduleSpec


class Scheduler:
    """Turns due times into submissions, one `tick` at a time.

    `grace`: a due time older than this when first seen counts as missed (the scheduler was down)
    and is subject to `catch_up`; younger ones are on time. `poll`: how often unfinished runs are
    checked while waiting. Every change of a run's state is printed to `out` when given.
    """

    def __init__(
        self,
        jobs: Sequence[ScheduledJob],
        history: RunHistory,
        cluster: Cluster,
        options: SubmitOptions | None = None,
        clock: Clock | None = None,
        grace: timedelta = timedelta(minutes=5),
        poll: timedelta = timedelta(seconds=30),
        out: TextIO | None = None,
    ):
        names = [job.name for job in jobs]
        if len(set(names)) != len(names):
            raise ScheduleError(f"two scheduled job files share a job name: {sorted(names)}")
        self.jobs = list(jobs)
        self.history = history
        self.cluster = cluster
        self.options = options or SubmitOptions()
        self.clock = clock or SystemClock()
        self.grace = grace
        self.poll = poll
        self.out = out
        self.submit_errors = 0  # submissions that failed since this scheduler started

    def tick(self) -> None:
        """Refresh unfinished runs, record what became due, start what may start."""
        now = self.clock.now()
        for job in self.jobs:
            self._refresh(job, now)
            self._record_due(job, now)
            self._start_next(job, now)

    def run(self, max_ticks: int | None = None) -> None:
        """Tick, then sleep until the next due time (or the next poll while runs are unfinished)."""
        ticks = 0
        while max_ticks is None or ticks < max_ticks:
            self.tick()
            ticks += 1
            now = self.clock.now()
            wake = min(next_after(job.schedule, now) for job in self.jobs)
            if self.history.runs(statuses=UNFINISHED):
                wake = min(wake, now + self.poll)
            self.clock.sleep(max((wake - now).total_seconds(), 1.0))

    def _report(self, run: Run) -> None:
        if self.out is not None:
            detail = f" {run.submission_id}" if run.submission_id else ""
            rows = f" ({run.rows_ok} ok, {run.rows_failed} failed)" if run.rows_ok is not None else ""
            error = f": {run.error}" if run.error else ""
            print(
                f"{run.job} {_iso(run.scheduled_for)}: {run.status}{detail}{rows}{error}",
                file=self.out,
                flush=True,
            )

    def _save(self, run: Run, info: RunInfo | None, now: datetime) -> None:
        """Records what the cluster says about a submitted run."""
        if info is None:
            run.status, run.error = "LOST", "the cluster no longer knows this submission"
        else:
            run.status, run.rows_ok, run.rows_failed = info.status, info.rows_ok, info.rows_failed
            run.error = info.message if info.status in ("FAILED", "STOPPED") else None
        self.history.update(run, now)

    def _refresh(self, job: ScheduledJob, now: datetime) -> None:
        for run in self.history.runs(job.name, ON_CLUSTER):
            try:
                info = self.cluster.info(run.submission_id)
            except ClusterError as exc:  # unreachable, or a failing dashboard: try again at the next tick
                log.warning("%s: cannot check %s on the cluster: %s", job.name, run.submission_id, exc)
                return
            before = run.status
            self._save(run, info, now)
            if run.status != before:
                self._report(run)

    def _record_due(self, job: ScheduledJob, now: datetime) -> None:
        recorded: list[Run] = []
        # The cursor is read inside the write transaction: another scheduler on the same database (a
        # shared volume, where the file lock does not hold) may have moved it since our last look.
        with self.history.transaction():
            cursor = self.history.cursor(job.name)
            if cursor is None:  # first time this job is seen: a run due within the grace period still counts
                cursor = now - self.grace
            if now > cursor:  # else the clock went back: those due times are recorded already
                recorded = self._record_between(job, cursor, now)
        for run in recorded:
            self._report(run)

    def _record_between(self, job: ScheduledJob, cursor: datetime, now: datetime) -> list[Run]:
        """Records the due times in (cursor, now] and moves the cursor; inside a transaction."""
        due = due_times(job.schedule, cursor, now)
        missed = [t for t in due if now - t > self.grace]
        on_time = [t for t in due if now - t <= self.grace]
        policy = job.schedule.catch_up
        # An on-time run supersedes a `latest` catch-up: both would process the same new data.
        keep = set(missed if policy == "all" else missed[-1:] if policy == "latest" and not on_time else [])
        recorded = []
        for moment in missed:
            if moment in keep:  # catch-up runs queue behind each other whatever `overlap` says
                run = self._queued(job, moment)
            else:
                run = Run(
                    job.name,
                    moment,
                    "MISSED",
                    error=f"due while the scheduler was down (catch_up: {policy})",
                )
            self.history.add(run, now)
            recorded.append(run)
        for moment in on_time:
            busy = self.history.runs(job.name, UNFINISHED)
            if busy and job.schedule.overlap == "skip":
                why = f"run {busy[0].submission_id} was still {busy[0].status.lower()} (overlap: skip)"
                run = Run(job.name, moment, "SKIPPED", error=why)
            else:
                run = self._queued(job, moment)
            self.history.add(run, now)
            recorded.append(run)
        self.history.set_cursor(job.name, now)
        return recorded

    @staticmethod
    def _queued(job: ScheduledJob, moment: datetime) -> Run:
        return Run(job.name, moment, QUEUED, submission_id=submission_id_for(job.name, moment))

    def _start_next(self, job: ScheduledJob, now: datetime) -> None:
        if self.history.runs(job.name, ON_CLUSTER):
            return
        queued = self.history.runs(job.name, [QUEUED])
        if not queued:
            return
        run = queued[0]
        try:
            # Submitted before a crash that hid the answer? Then adopt it instead of submitting twice.
            known = self.cluster.info(run.submission_id)
            if known is not None:
                self._save(run, known, now)
                self._report(run)
                return
            self.cluster.submit(
                job.path,
                self.options,
                submission_id=run.submission_id,
                run_date=run_date_for(job.schedule, run.scheduled_for),
                run_id=run_id_for(run.scheduled_for),
                metadata={"lance_ray_scheduled_for": _iso(run.scheduled_for)},
            )
            run.status, run.error = "PENDING", None
        except ClusterUnreachable as exc:  # stays QUEUED; the next tick tries again
            run.error = f"cannot reach the cluster, will retry: {exc}"
            self.submit_errors += 1
        # A job file that became invalid or too big, a refused submission, an unreadable input: this
        # run fails, the scheduler goes on with the next.
        except (LanceRayError, OSError, ValueError) as exc:
            if isinstance(exc, ClusterError) and self._adopt_if_submitted(run, now):
                return
            run.status, run.error = "SUBMIT_FAILED", f"{type(exc).__name__}: {exc}"
            self.submit_errors += 1
        self.history.update(run, now)
        self._report(run)

    def _adopt_if_submitted(self, run: Run, now: datetime) -> bool:
        """After a refused submission: whether the cluster has the run after all (another scheduler on the
        same history submitted it in between, and the cluster refused the duplicate id); if so, record it."""
        try:
            known = self.cluster.info(run.submission_id)
        except ClusterError:
            return False
        if known is None:
            return False
        self._save(run, known, now)
        self._report(run)
        return True


def load_scheduled_jobs(paths: Sequence[str]) -> list[ScheduledJob]:
    """Loads and validates the job files; raises JobSpecError / ScheduleError with a clear message."""
    from lance_ray.spec import load_job

    jobs = []
    for path in paths:
        try:
            job = load_job(path)
        except FileNotFoundError:
            raise ScheduleError(f"{path}: no such job file") from None
        if job.schedule is None:
            raise ScheduleError(
                f"{path}: the job file has no `schedule:` block "
                "(e.g. schedule: {cron: '0 2 * * *', timezone: UTC})"
            )
        jobs.append(ScheduledJob(job.name, Path(path).resolve(), job.schedule))
    return jobs
