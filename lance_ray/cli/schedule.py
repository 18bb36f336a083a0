"""The `schedule` command: submit job files to a Ray cluster on their cron schedule.

    lance-ray schedule nightly.yaml --address http://HEAD:8265          long-lived scheduler
    lance-ray schedule nightly.yaml --address http://HEAD:8265 --once   submit what is due now, exit
    lance-ray schedule nightly.yaml --emit raycronjob > nightly.k8s.yaml   or let Kubernetes do it

The rules (due times, overlap, catch-up, the run history) are in lance_ray.cluster.schedule; the
Kubernetes manifests in lance_ray.cluster.kubernetes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from lance_ray import __version__
from lance_ray.cli.exit_codes import EXIT_OK
from lance_ray.cli.remote import ADDRESS_HELP, add_submit_options, submit_options_from_args
from lance_ray.cluster.kubernetes import DEFAULT_IMAGE, KINDS
from lance_ray.errors import JobFileError, RunError

if TYPE_CHECKING:
    from lance_ray.cluster.schedule import Run


def default_history_path() -> Path:
    return Path(os.environ.get("LANCE_RAY_HOME", Path.home() / ".lance-ray")) / "schedule.sqlite"


def format_history(runs: Sequence[Run], zone_of: dict[str, ZoneInfo]) -> str:
    header = f"{'job':<20} {'scheduled for':<25} {'status':<13} {'ok':>6} {'failed':>6}  submission / error"
    lines = [header, "-" * len(header)]
    for run in runs:
        local = run.scheduled_for.astimezone(zone_of.get(run.job, timezone.utc)).isoformat(timespec="minutes")
        ok = "" if run.rows_ok is None else run.rows_ok
        failed = "" if run.rows_failed is None else run.rows_failed
        lines.append(
            f"{run.job:<20} {local:<25} {run.status:<13} {ok:>6} {failed:>6}  "
            f"{run.submission_id or ''}{'  ' + run.error if run.error else ''}"
        )
    return "\n".join(lines)


EMIT_HEADER = "# lance-ray schedule --emit"  # the first line of a manifest file this command wrote


def emit_manifests(args: argparse.Namespace) -> int:
    """`--emit KIND`: the Kubernetes manifests that run the job on its schedule, on stdout or in --out."""
    from lance_ray.cluster.kubernetes import schedule_manifests
    from lance_ray.spec import load_job

    if len(args.jobs) != 1:
        raise JobFileError("--emit writes the manifests of one job file at a time")
    (path,) = args.jobs
    try:
        job = load_job(path)
    except FileNotFoundError:
        raise JobFileError(f"{path}: no such job file") from None
    manifests = schedule_manifests(path, job, args.emit, image=args.image, address=args.address,
                                   max_gpus=args.max_gpus)
    text = f"{EMIT_HEADER} {args.emit} {path} (lance-ray {__version__})\n" + manifests.to_yaml()
    for note in manifests.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.out is None:
        sys.stdout.write(text)
        return EXIT_OK
    out = Path(args.out)
    if out.exists() and not out.read_text(encoding="utf-8", errors="replace").startswith(EMIT_HEADER):
        raise JobFileError(f"{out} exists and was not written by lance-ray schedule --emit; not replacing it")
    out.write_text(text, encoding="utf-8")
    print(out)
    return EXIT_OK


def cmd_schedule(args: argparse.Namespace) -> int:
    from filelock import FileLock, Timeout

    from lance_ray.cluster.remote import RemoteCluster
    from lance_ray.cluster.schedule import (
        RunHistory,
        ScheduleError,
        Scheduler,
        load_scheduled_jobs,
        next_after,
    )

    if args.emit:
        return emit_manifests(args)
    jobs = load_scheduled_jobs(args.jobs)
    options = submit_options_from_args(args)
    history_path = Path(args.history) if args.history else default_history_path()
    zones = {job.name: ZoneInfo(job.schedule.timezone) for job in jobs}
    if args.show:
        runs = RunHistory(history_path).runs() if history_path.exists() else []
        print(format_history([r for r in runs if r.job in zones], zones))
        return EXIT_OK

    cluster = RemoteCluster(args.address)  # unreachable: fail before anything is recorded
    history_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(history_path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ScheduleError(f"another scheduler is using {history_path}") from None
    try:
        scheduler = Scheduler(jobs, RunHistory(history_path), cluster, options,
                              grace=timedelta(seconds=args.grace), poll=timedelta(seconds=args.poll),
                              out=sys.stdout)
        now = scheduler.clock.now()
        for job in jobs:
            s = job.schedule
            upcoming = next_after(s, now).astimezone(zones[job.name]).isoformat()
            print(f"{job.name}: cron {s.cron!r} in {s.timezone}, overlap {s.overlap}, catch_up {s.catch_up}; "
                  f"next run {upcoming}")
        print(f"history: {history_path}", flush=True)
        if args.once:
            scheduler.tick()
            if scheduler.submit_errors:
                raise RunError(f"{scheduler.submit_errors} submission(s) failed (see above, or --show)")
            return EXIT_OK
        try:
            scheduler.run()
        except KeyboardInterrupt:
            raise KeyboardInterrupt("scheduler stopped; submitted runs keep running on the cluster") from None
        return EXIT_OK  # run() only returns when given a number of ticks
    finally:
        lock.release()


def add_schedule_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "schedule",
        help="submit job files to a Ray cluster on their cron schedule",
        description="Submits each job file's due runs (its `schedule:` block) through the Ray Jobs API and "
        "keeps a run history. Runs until interrupted, or with --once submits what is due and exits "
        "(for system cron; keep --history on persistent storage). With --emit it runs nothing and writes "
        "Kubernetes manifests instead, which let Kubernetes run the job on its schedule: a KubeRay "
        "RayCronJob (a Ray cluster per run) or a CronJob that submits to a running Ray cluster at --address "
        "(docs/deploy.md compares them).",
        epilog="exit status: 0 ok (Ctrl-C stops the long-lived scheduler with 130); 2 a job file cannot be "
        "scheduled, or --out names a file that --emit did not write; 3 with --once, a submission failed; "
        "4 the cluster cannot be reached.",
    )
    p.add_argument("jobs", nargs="+", metavar="JOB", help="job files with a schedule: block")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--once", action="store_true", help="submit what is due now and exit")
    p.add_argument("--history", help=f"SQLite run history (default: {default_history_path()})")
    p.add_argument("--show", action="store_true", help="print the run history of these jobs and exit")
    p.add_argument("--grace", type=float, default=300.0,
                   help="seconds after its time a run still counts as on time, not missed (default 300)")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between status checks of running runs")
    p.add_argument("--emit", choices=KINDS, help="write Kubernetes manifests that run the job on its schedule "
                   "instead of scheduling it here: raycronjob (KubeRay >= 1.6) or cronjob (needs --address)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"--emit: container image with lance-ray installed "
                   f"(default {DEFAULT_IMAGE})")
    p.add_argument("--max-gpus", type=int, default=8, help="--emit raycronjob: most GPU workers (default 8)")
    p.add_argument("--out", metavar="FILE", help="--emit: write the manifests here instead of to stdout")
    add_submit_options(p)
    p.set_defaults(func=cmd_schedule)
