"""Schedules: due times across DST, overlap and catch-up policies, the SQLite history, bad input.

The policy tests drive the scheduler with an injected clock and an in-memory cluster that plays the
Jobs API (runs finish a set time after submission), so nothing sleeps. The run through a real Ray
head is in test_remote.py, next to the head fixture.

Expected instants are derived by hand from the DST rules, not from zoneinfo: the EU switches at
01:00 UTC on the last Sunday of March (2026-03-29) and October (2026-10-25); the US at 02:00 local
on the second Sunday of March (2026-03-08).
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from fake_clock import FakeClock

from lance_ray.cli import main
from lance_ray.cluster.remote import ClusterUnreachable, RunInfo, SubmitOptions
from lance_ray.cluster.schedule import (
    QUEUED,
    RunHistory,
    ScheduledJob,
    Scheduler,
    due_times,
    next_after,
    submission_id_for,
    wall_to_utc,
)
from lance_ray.errors import ClusterError
from lance_ray.spec import ScheduleSpec

UTC = timezone.utc


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --------------------------------------------------------------------------------- due-time rules


def test_daily_across_spring_forward_runs_once_per_day():
    berlin = ScheduleSpec(cron="0 2 * * *", timezone="Europe/Berlin")
    got = due_times(berlin, utc(2026, 3, 27), utc(2026, 4, 1))
    assert got == [
        utc(2026, 3, 27, 1),  # 02:00 CET (+1)
        utc(2026, 3, 28, 1),
        utc(2026, 3, 29, 1),  # 02:00 does not exist: runs at the jump (03:00 CEST)
        utc(2026, 3, 30, 0),  # 02:00 CEST (+2)
        utc(2026, 3, 31, 0),
        utc(2026, 4, 1, 0),  # `until` is inclusive
    ]


def test_daily_across_fall_back_runs_the_first_occurrence():
    berlin = ScheduleSpec(cron="30 2 * * *", timezone="Europe/Berlin")
    got = due_times(berlin, utc(2026, 10, 24), utc(2026, 10, 27))
    # 02:30 happens twice on Oct 25 (00:30 UTC in CEST, 01:30 UTC in CET): only the first runs.
    assert got == [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_hourly_across_spring_forward_has_no_duplicates():
    berlin = ScheduleSpec(cron="0 * * * *", timezone="Europe/Berlin")
    got = due_times(berlin, utc(2026, 3, 28, 23, 30), utc(2026, 3, 29, 3))
    # Wall 01:00 CET, 02:00 (skipped → the jump at 01:00 UTC), 03:00 CEST (= the jump, one run), 04:00, 05:00.
    assert got == [utc(2026, 3, 29, 0), utc(2026, 3, 29, 1), utc(2026, 3, 29, 2), utc(2026, 3, 29, 3)]


def test_new_york_spring_forward():
    ny = ScheduleSpec(cron="30 2 * * *", timezone="America/New_York")
    got = due_times(ny, utc(2026, 3, 7), utc(2026, 3, 10))
    # Mar 7 02:30 EST (-5); Mar 8 02:30 is skipped (jump at 07:00 UTC); Mar 9 02:30 EDT (-4).
    assert got == [utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7), utc(2026, 3, 9, 6, 30)]


def test_wall_to_utc_round_trips_every_minute_of_both_transition_days():
    zone = ZoneInfo("Europe/Berlin")
    for day in (datetime(2026, 3, 29), datetime(2026, 10, 25)):
        previous = None
        for minute in range(24 * 60):
            wall = day + timedelta(minutes=minute)
            instant = wall_to_utc(wall, zone)
            local = instant.astimezone(zone).replace(tzinfo=None)
            skipped = day.month == 3 and 2 <= wall.hour < 3
            assert local == (datetime(2026, 3, 29, 3) if skipped else wall)
            assert previous is None or instant >= previous  # monotonic: due-time walking relies on it
            previous = instant


def test_utc_schedule_matches_croniter():
    schedule = ScheduleSpec(cron="*/7 3-5 * * 1-5")
    start, end = utc(2026, 5, 1), utc(2026, 5, 15)
    it = croniter(schedule.cron, start)
    expected = []
    while (t := it.get_next(datetime)) <= end:
        expected.append(t)
    assert due_times(schedule, start, end) == expected
    assert next_after(schedule, start) == expected[0]


# ------------------------------------------------------------------------------- policy harness


class FakeCluster:
    """The Jobs API as the scheduler sees it: a run succeeds `duration` after it was submitted."""

    def __init__(self, clock: FakeClock, duration: timedelta):
        self.clock, self.duration = clock, duration
        self.submitted: dict[str, tuple[datetime, dict]] = {}
        self.overlaps = 0
        self.unreachable = False

    def submit(
        self, job_path, options, *, submission_id=None, run_date=None, run_id=None, metadata=None
    ) -> str:
        if self.unreachable:
            raise ClusterUnreachable("connection refused")
        assert submission_id not in self.submitted, "the cluster refuses a duplicate submission id"
        if any(self.info(sid).status == "RUNNING" for sid in self.submitted):
            self.overlaps += 1
        self.submitted[submission_id] = (self.clock.now(), {"run_date": run_date, "run_id": run_id})
        return submission_id

    def info(self, submission_id: str) -> RunInfo | None:
        if self.unreachable:
            raise ClusterUnreachable("connection refused")
        if submission_id not in self.submitted:
            return None
        done = self.clock.now() >= self.submitted[submission_id][0] + self.duration
        return RunInfo(
            submission_id,
            "SUCCEEDED" if done else "RUNNING",
            "nightly",
            "lance-ray run",
            None,
            None,
            None,
            {},
            {},
            rows_ok=5 if done else None,
            rows_failed=0 if done else None,
        )

    def order(self) -> list[str]:
        return sorted(self.submitted, key=lambda sid: self.submitted[sid][0])


def make_scheduler(tmp_path: Path, clock: FakeClock, cluster: FakeCluster, **schedule) -> Scheduler:
    job = ScheduledJob("nightly", tmp_path / "nightly.yaml", ScheduleSpec(**schedule))
    return Scheduler(
        [job],
        RunHistory(tmp_path / "history.sqlite"),
        cluster,
        SubmitOptions(),
        clock,
        grace=timedelta(minutes=5),
        poll=timedelta(minutes=1),
    )


def statuses(scheduler: Scheduler) -> list[tuple[datetime, str]]:
    return [(r.scheduled_for, r.status) for r in scheduler.history.runs("nightly")]


# -------------------------------------------------------------------------------- overlap policy


def test_overlap_skip_never_starts_a_second_run(tmp_path):
    clock = FakeClock(utc(2026, 1, 1))
    cluster = FakeCluster(clock, duration=timedelta(minutes=25))
    scheduler = make_scheduler(tmp_path, clock, cluster, cron="*/10 * * * *", overlap="skip")
    scheduler.run(max_ticks=80)  # ticks at due times and every poll minute while a run is unfinished
    assert cluster.overlaps == 0
    # Runs take 25 min: 00:00 runs, 00:10 and 00:20 are skipped, 00:30 runs (00:00 ended at 00:25) …
    started = [scheduled for scheduled, status in statuses(scheduler) if status != "SKIPPED"]
    assert started[:3] == [utc(2026, 1, 1, 0, 0), utc(2026, 1, 1, 0, 30), utc(2026, 1, 1, 1, 0)]
    skipped = [scheduled for scheduled, status in statuses(scheduler) if status == "SKIPPED"]
    assert skipped[:2] == [utc(2026, 1, 1, 0, 10), utc(2026, 1, 1, 0, 20)]
    assert clock.slept and max(clock.slept) <= 600  # it slept to the next due time or poll, never longer


def test_overlap_queue_starts_each_run_when_the_previous_ends(tmp_path):
    clock = FakeClock(utc(2026, 1, 1))
    cluster = FakeCluster(clock, duration=timedelta(minutes=15))
    scheduler = make_scheduler(tmp_path, clock, cluster, cron="*/10 * * * *", overlap="queue")
    scheduler.run(max_ticks=40)
    assert cluster.overlaps == 0
    order = cluster.order()
    assert order[:3] == [submission_id_for("nightly", utc(2026, 1, 1, 0, m)) for m in (0, 10, 20)]
    starts = [cluster.submitted[sid][0] for sid in order]
    assert all(b - a >= timedelta(minutes=15) for a, b in zip(starts, starts[1:], strict=False))
    assert "SKIPPED" not in {status for _, status in statuses(scheduler)}


# ------------------------------------------------------------------------- catch-up after downtime


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("none", {2: "MISSED", 3: "MISSED", 4: "MISSED"}),
        ("latest", {2: "MISSED", 3: "MISSED", 4: "RUN"}),
        ("all", {2: "RUN", 3: "RUN", 4: "RUN"}),
    ],
)
def test_catch_up_after_downtime(tmp_path, policy, expected):
    clock = FakeClock(utc(2026, 1, 1, 2, 0, 10))
    cluster = FakeCluster(clock, duration=timedelta(minutes=30))
    first = make_scheduler(tmp_path, clock, cluster, cron="0 2 * * *", catch_up=policy)
    first.tick()
    assert statuses(first) == [(utc(2026, 1, 1, 2), "PENDING")]
    first.history.close()  # the scheduler goes down for three days

    clock.at(utc(2026, 1, 4, 10))
    second = make_scheduler(tmp_path, clock, cluster, cron="0 2 * * *", catch_up=policy)
    for _ in range(4):  # catch-up runs go one after another
        second.tick()
        clock.sleep(31 * 60)
    history = dict(statuses(second))
    assert history[utc(2026, 1, 1, 2)] == "SUCCEEDED"  # survived the restart, then refreshed
    for day, outcome in expected.items():
        assert history[utc(2026, 1, day, 2)] == ("SUCCEEDED" if outcome == "RUN" else "MISSED")
    assert cluster.order() == [
        submission_id_for("nightly", utc(2026, 1, d, 2))
        for d in [1, *sorted(day for day, outcome in expected.items() if outcome == "RUN")]
    ]
    assert cluster.overlaps == 0


def test_history_survives_restart_with_rows_and_run_context(tmp_path):
    clock = FakeClock(utc(2026, 6, 1, 15, 0, 30))
    cluster = FakeCluster(clock, duration=timedelta(minutes=1))
    # 00:00 in Tokyo (+9) is 15:00 UTC the day before: {run_date} is the Tokyo date.
    scheduler = make_scheduler(tmp_path, clock, cluster, cron="0 0 * * *", timezone="Asia/Tokyo")
    scheduler.tick()
    (sid,) = cluster.submitted
    assert cluster.submitted[sid][1] == {"run_date": "2026-06-02", "run_id": "20260601T150000Z"}
    clock.sleep(120)
    scheduler.tick()
    scheduler.history.close()
    reopened = RunHistory(tmp_path / "history.sqlite")
    (run,) = reopened.runs("nightly")
    assert (run.status, run.submission_id, run.rows_ok, run.rows_failed) == ("SUCCEEDED", sid, 5, 0)


def test_a_run_submitted_before_a_crash_is_adopted_not_resubmitted(tmp_path):
    clock = FakeClock(utc(2026, 1, 1, 2, 0, 5))
    cluster = FakeCluster(clock, duration=timedelta(minutes=10))
    scheduler = make_scheduler(tmp_path, clock, cluster, cron="0 2 * * *")
    moment = utc(2026, 1, 1, 2)
    sid = submission_id_for("nightly", moment)
    # The crash: the QUEUED row and the cursor were committed, the cluster accepted the run,
    # but the scheduler died before writing that down.
    with scheduler.history.transaction():
        scheduler.history.add(Scheduler._queued(scheduler.jobs[0], moment), clock.now())
        scheduler.history.set_cursor("nightly", clock.now())
    cluster.submit(None, None, submission_id=sid)
    scheduler.tick()
    assert statuses(scheduler) == [(moment, "RUNNING")]
    assert list(cluster.submitted) == [sid]


def test_unreachable_cluster_keeps_the_run_queued_and_retries(tmp_path):
    clock = FakeClock(utc(2026, 1, 1, 2, 0, 5))
    cluster = FakeCluster(clock, duration=timedelta(minutes=1))
    cluster.unreachable = True
    scheduler = make_scheduler(tmp_path, clock, cluster, cron="0 2 * * *")
    scheduler.tick()
    (run,) = scheduler.history.runs("nightly")
    assert run.status == QUEUED and "cannot reach" in run.error and scheduler.submit_errors == 1
    cluster.unreachable = False
    clock.sleep(60)
    scheduler.tick()
    assert statuses(scheduler) == [(utc(2026, 1, 1, 2), "PENDING")]
    assert list(cluster.submitted) == [run.submission_id]


def test_first_start_counts_only_runs_within_the_grace_period(tmp_path):
    clock = FakeClock(utc(2026, 1, 1, 2, 3, 30))  # grace is 5 min: 01:58:30 is the horizon
    cluster = FakeCluster(clock, duration=timedelta(minutes=1))
    scheduler = make_scheduler(tmp_path, clock, cluster, cron="*/2 * * * *", overlap="queue")
    scheduler.tick()
    assert statuses(scheduler) == [(utc(2026, 1, 1, 2, 0), "PENDING"), (utc(2026, 1, 1, 2, 2), QUEUED)]


# ------------------------------------------------------------------------------------- bad input


def write_job(tmp_path: Path, schedule: str) -> Path:
    job = tmp_path / "nightly.yaml"
    job.write_text(
        textwrap.dedent(f"""\
        name: nightly
        models: {{image: {{source: lance-tiny, backend: debug}}}}
        output: {tmp_path / "out"}
        schedule: {schedule}
        steps:
          - name: gen
            task: t2i
            input: {{rows: [{{prompt: a cat}}]}}
            params: {{height: 32, width: 32, steps: 1}}
        """)
    )
    return job


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ('{cron: "61 2 * * *"}', "invalid cron expression"),
        ('{cron: "0 2 * * *", timezone: Mars/Olympus}', "unknown time zone"),
        ('{cron: "0 2 * * *", overlap: sometimes}', "overlap"),
    ],
)
def test_bad_schedule_is_rejected_before_anything_is_written(tmp_path, capsys, schedule, message):
    job = write_job(tmp_path, schedule)
    history = tmp_path / "state" / "history.sqlite"
    rc = main(["schedule", str(job), "--once", "--history", str(history), "--address", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and f"{job}:4:" in err  # file:line:col of the schedule line
    assert not history.parent.exists()


def test_unreachable_address_fails_without_touching_history(tmp_path, capsys):
    job = write_job(tmp_path, '{cron: "0 2 * * *"}')
    history = tmp_path / "history.sqlite"
    rc = main(["schedule", str(job), "--once", "--history", str(history), "--address", "http://127.0.0.1:9"])
    assert rc == 4
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in capsys.readouterr().err
    assert not history.exists()


def test_job_without_schedule_is_refused(tmp_path, capsys):
    job = write_job(tmp_path, "null")
    rc = main(["schedule", str(job), "--once", "--history", str(tmp_path / "h.sqlite")])
    assert rc == 2
    assert "no `schedule:` block" in capsys.readouterr().err


def test_history_rows_and_cursor_commit_together(tmp_path):
    """A failure while recording due times leaves neither rows nor a moved cursor behind."""
    clock = FakeClock(utc(2026, 1, 1, 2, 3, 30))  # two due times to record: 02:00 and 02:02
    cluster = FakeCluster(clock, duration=timedelta(minutes=1))
    scheduler = make_scheduler(tmp_path, clock, cluster, cron="*/2 * * * *", overlap="queue")
    real_add, calls = scheduler.history.add, []

    def add_then_fail(run, now):
        calls.append(run)
        if len(calls) == 2:
            raise sqlite3.OperationalError("disk I/O error")
        real_add(run, now)

    scheduler.history.add = add_then_fail
    with pytest.raises(sqlite3.OperationalError):
        scheduler.tick()
    fresh = RunHistory(tmp_path / "history.sqlite")
    assert len(calls) == 2 and fresh.runs() == [] and fresh.cursor("nightly") is None
    assert cluster.submitted == {}


# ------------------------------------------------------------------------- incremental nightly runs


def test_fixed_output_path_makes_the_next_run_process_only_new_files(ray_local, tmp_path):
    """Day 1 captions N images; M new ones arrive; day 2 (same job, same output) processes exactly M."""
    from lance_ray.pipeline.runner import run_job
    from lance_ray.pipeline.sinks import read_step_output
    from lance_ray.spec import load_job

    samples = sorted((Path(__file__).resolve().parents[1] / "datasets" / "images").iterdir())
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    day1, day2 = samples[:3], samples[3:5]
    for image in day1:
        (uploads / image.name).write_bytes(image.read_bytes())
    job_path = tmp_path / "nightly.yaml"
    job_path.write_text(
        textwrap.dedent("""\
        name: nightly
        models: {image: {source: lance-tiny, backend: debug}}
        output: out
        schedule: {cron: "0 2 * * *"}
        steps:
          - name: caption
            task: x2t_image
            input: {path: uploads, prompt: "Describe it."}
            params: {preset: image_256res}
        """)
    )
    job = load_job(job_path)
    first = run_job(job.with_run_context("2026-01-01", "r1"), progress=False)
    assert (first.steps[0].ok, first.steps[0].skipped) == (len(day1), 0)
    committed = read_step_output(str(tmp_path / "out" / "caption"))

    for image in day2:
        (uploads / image.name).write_bytes(image.read_bytes())
    second = run_job(job.with_run_context("2026-01-02", "r2"), progress=False)
    assert (second.steps[0].ok, second.steps[0].failed, second.steps[0].skipped) == (len(day2), 0, len(day1))

    table = read_step_output(str(tmp_path / "out" / "caption"))
    assert (
        table.num_rows == len(day1) + len(day2)
        and len(set(table.column("row_id").to_pylist())) == table.num_rows
    )
    first_rows = {r["row_id"]: r["started_at"] for r in committed.to_pylist()}
    assert {
        r["row_id"]: r["started_at"] for r in table.to_pylist() if r["row_id"] in first_rows
    } == first_rows


# ------------------------------------------------------------------- two schedulers, one history


class DirCluster:
    """A Jobs API shared by processes through a folder: one file per submission, created exclusively, so
    a second submission of an id is refused as Ray refuses it. A run succeeds `duration` after it starts."""

    def __init__(self, folder: Path, clock: FakeClock, duration: timedelta):
        self.folder, self.clock, self.duration = folder, clock, duration

    def submit(self, job_path, options, *, submission_id=None, run_date=None, run_id=None, metadata=None) -> str:
        # Written aside, then linked into place: the submission appears whole, and only once.
        draft = self.folder / f".{submission_id}.{os.getpid()}"
        draft.write_text(self.clock.now().isoformat())
        try:
            os.link(draft, self.folder / submission_id)
        except FileExistsError:
            raise ClusterError(f"the cluster refused the submission: {submission_id} already exists") from None
        finally:
            draft.unlink()
        return submission_id

    def info(self, submission_id: str) -> RunInfo | None:
        path = self.folder / submission_id
        if not path.exists():
            return None
        text = path.read_text()
        done = self.clock.now() >= datetime.fromisoformat(text) + self.duration
        return RunInfo(submission_id, "SUCCEEDED" if done else "RUNNING", "race", "lance-ray run", None, None,
                       None, {}, {}, rows_ok=1 if done else None, rows_failed=0 if done else None)


RACE_START = utc(2026, 3, 1, 12, 0)


def race_scheduler(history: Path, cluster: Path, barrier, ticks: int) -> None:
    """One of two scheduler processes on one history database; both tick at the same instants."""
    clock = FakeClock(RACE_START)
    job = ScheduledJob("race", history.parent / "race.yaml", ScheduleSpec(cron="* * * * *", overlap="queue"))
    scheduler = Scheduler([job], RunHistory(history), DirCluster(cluster, clock, timedelta(seconds=30)),
                          SubmitOptions(), clock, grace=timedelta(minutes=2), poll=timedelta(seconds=30))
    for tick in range(ticks):
        barrier.wait(timeout=60)
        clock.at(RACE_START + timedelta(seconds=30 * tick))
        scheduler.tick()


def test_two_scheduler_processes_share_one_history(tmp_path):
    """On a shared volume the file lock does not hold: two schedulers tick together on one database.
    Each due time is recorded and submitted exactly once, and neither process fails."""
    context = multiprocessing.get_context("spawn")
    ticks = 60
    for trial in range(3):
        folder = tmp_path / f"trial{trial}"
        (folder / "cluster").mkdir(parents=True)
        barrier = context.Barrier(2)
        processes = [context.Process(target=race_scheduler, args=(folder / "h.sqlite", folder / "cluster",
                                                                    barrier, ticks)) for _ in range(2)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=300)
        assert [p.exitcode for p in processes] == [0, 0], f"trial {trial}: a scheduler crashed (see stderr)"
        runs = RunHistory(folder / "h.sqlite").runs("race")
        last = RACE_START + timedelta(seconds=30 * (ticks - 1))
        assert [r.scheduled_for for r in runs] == due_times(ScheduleSpec(cron="* * * * *"),
                                                            RACE_START - timedelta(minutes=2), last)
        submitted = sorted(p.name for p in (folder / "cluster").iterdir() if not p.name.startswith("."))
        assert submitted == sorted(r.submission_id for r in runs if r.status != QUEUED)
        assert {r.status for r in runs} <= {"SUCCEEDED", "RUNNING", "PENDING", QUEUED}, [
            (r.status, r.error) for r in runs if r.error]


def test_a_submission_the_other_scheduler_made_first_is_adopted(tmp_path):
    """Both schedulers found the run unsubmitted; the other one submitted it first, so the cluster refuses
    ours as a duplicate id: the run is the other's, running, not a failed submission."""
    clock = FakeClock(utc(2026, 1, 1, 2, 0, 30))
    cluster = FakeCluster(clock, duration=timedelta(minutes=10))
    scheduler = make_scheduler(tmp_path, clock, cluster, cron="0 2 * * *")
    real_info = cluster.info
    answers = iter([None])  # the first look: not submitted yet

    def info(submission_id):
        return next(answers, None) if submission_id not in cluster.submitted else real_info(submission_id)

    def submit_after_the_other(job_path, options, *, submission_id=None, **kwargs):
        cluster.submitted[submission_id] = (clock.now(), {})  # the other scheduler's submission
        raise ClusterError(f"the cluster refused the submission: job {submission_id} already exists")

    cluster.info, cluster.submit = info, submit_after_the_other
    scheduler.tick()
    assert statuses(scheduler) == [(utc(2026, 1, 1, 2), "RUNNING")] and scheduler.submit_errors == 0
