"""Commands for runs on a remote Ray cluster, through its Jobs API: submit, status, logs, stop, list.

The work is done by lance_ray.cluster.remote, imported inside the commands (it loads Ray's SDK).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from lance_ray.cli.exit_codes import (
    EXIT_BAD_JOB,
    EXIT_CLUSTER,
    EXIT_CODES_HELP,
    EXIT_OK,
    EXIT_ROWS_FAILED,
)
from lance_ray.cli.jobs import load_job_file, scheduled_run
from lance_ray.errors import ClusterError, JobFileError, RunError

if TYPE_CHECKING:
    from lance_ray.cluster.remote import RemoteCluster, RunInfo, SubmitOptions

ADDRESS_HELP = "Ray dashboard address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"


def finished_run_outcome(info: RunInfo) -> int:
    """A finished remote run as the outcome of this command, so that `submit --follow` and
    `logs --follow` exit as `lance-ray run` did on the cluster: 0 or 1 are returned, a run that
    failed is raised as the error its exit code stands for (2, 4, else 3)."""
    if info.status == "SUCCEEDED":
        return EXIT_OK
    if info.driver_exit_code == EXIT_ROWS_FAILED:
        return EXIT_ROWS_FAILED
    what = f"submission {info.submission_id} {info.status}" + (f": {info.message}" if info.message else "")
    if info.driver_exit_code == EXIT_BAD_JOB:
        raise JobFileError(f"{what} (the job file was refused on the cluster; its logs say why)")
    if info.driver_exit_code == EXIT_CLUSTER:
        raise ClusterError(what)
    raise RunError(what)  # exit code 3, a STOPPED run, or a driver that never ran (runtime env setup)


def _fmt_time(moment: datetime | None) -> str:
    return moment.astimezone().isoformat(timespec="seconds") if moment else "-"


def format_info(info: RunInfo) -> str:
    from lance_ray.cluster.remote import mask_env

    env = info.runtime_env.get("env_vars") or {}
    rows = "-" if info.rows_ok is None else f"{info.rows_ok} ok, {info.rows_failed} failed"
    lines = [
        f"submission: {info.submission_id}",
        f"job:        {info.job_name or '(not a lance-ray job)'}",
        f"status:     {info.status}" + (f" ({info.message})" if info.message else ""),
        f"started:    {_fmt_time(info.start_time)}",
        f"ended:      {_fmt_time(info.end_time)}",
        f"rows:       {rows}",
        f"entrypoint: {info.entrypoint}",
    ]
    if env:
        lines.append(f"env vars:   {', '.join(f'{k}={v}' for k, v in mask_env(env).items())}")
    return "\n".join(lines)


def format_list(infos: Sequence[RunInfo]) -> str:
    header = (
        f"{'submission':<44} {'job':<20} {'status':<10} {'started':<26} {'ended':<26} {'ok':>6} {'failed':>6}"
    )
    lines = [header, "-" * len(header)]
    for info in infos:
        ok = "" if info.rows_ok is None else info.rows_ok
        failed = "" if info.rows_failed is None else info.rows_failed
        lines.append(
            f"{info.submission_id:<44} {info.job_name or '-':<20} {info.status:<10} "
            f"{_fmt_time(info.start_time):<26} {_fmt_time(info.end_time):<26} {ok:>6} {failed:>6}"
        )
    return "\n".join(lines)


def submit_options_from_args(args: argparse.Namespace) -> SubmitOptions:
    from lance_ray.cluster.remote import DEFAULT_PIP, SubmitOptions

    pip = args.pip_requirement or (DEFAULT_PIP if args.pip else None)
    options = SubmitOptions(pip=pip, env_from_local=tuple(args.env_from_local), output=args.output,
                            allow_outside_inputs=args.allow_outside_inputs)
    options.env_vars()  # a variable that is not set fails now, not at the first submission
    return options


def add_submit_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `submit` and `schedule`."""
    from lance_ray.cluster.remote import DEFAULT_PIP  # a light import: Ray's SDK loads in RemoteCluster

    parser.add_argument(
        "--pip",
        action="store_true",
        help=f"install lance-ray into the job's runtime env with pip ({DEFAULT_PIP}); "
        "without it the cluster must have lance-ray installed",
    )
    parser.add_argument(
        "--pip-requirement",
        metavar="REQUIREMENT",
        help="what --pip installs instead, e.g. 'git+https://github.com/YOU/lance-ray@main' (implies --pip)",
    )
    parser.add_argument(
        "--env-from-local",
        action="append",
        default=[],
        metavar="NAME",
        help="forward this environment variable from here to the job (repeatable; "
        "e.g. AWS_PROFILE); values are never printed",
    )
    parser.add_argument(
        "--output",
        help="output root for this submission (e.g. s3://bucket/prefix), instead of the job file's",
    )
    parser.add_argument(
        "--allow-outside-inputs",
        action="store_true",
        help="also ship files that table rows name outside the folders the job's input.path entries name "
        "(refused by default: a row naming ~/.aws/credentials must not upload it)",
    )


def _connect(address: str | None) -> RemoteCluster:
    from lance_ray.cluster.remote import RemoteCluster

    return RemoteCluster(address)


def follow_to_end(cluster: RemoteCluster, submission_id: str) -> int:
    """Streams a run's logs to stdout until it ends; the run's outcome is this command's."""
    from lance_ray.cluster.remote import UnknownSubmission

    try:
        cluster.follow(submission_id, sys.stdout)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"stopped following; the run goes on (lance-ray stop {submission_id} ends it)"
        ) from None
    info = cluster.info(submission_id)
    if info is None:
        raise UnknownSubmission(f"the cluster no longer knows {submission_id}")
    print(f"{submission_id}: {info.status}", file=sys.stderr)
    return finished_run_outcome(info)


def cmd_submit(args: argparse.Namespace) -> int:
    job = load_job_file(args.job)  # a bad job file fails here, before any network
    options = submit_options_from_args(args)
    run = {"submission_id": args.submission_id, "run_date": args.run_date, "run_id": args.run_id}
    metadata = None
    if args.scheduled:  # what the built-in scheduler would submit for the time due last
        scheduled = scheduled_run(job)
        run = {key: value or getattr(scheduled, key) for key, value in run.items()}
        metadata = {"lance_ray_scheduled_for": scheduled.scheduled_for.isoformat()}
    cluster = _connect(args.address)
    submission_id = cluster.submit(args.job, options, metadata=metadata, out=sys.stderr, **run)
    print(submission_id)
    if not args.follow:
        print(
            f"follow it with: lance-ray logs {submission_id} --follow"
            + (f" --address {args.address}" if args.address else ""),
            file=sys.stderr,
        )
        return EXIT_OK
    return follow_to_end(cluster, submission_id)


def cmd_status(args: argparse.Namespace) -> int:
    from lance_ray.cluster.remote import UnknownSubmission

    cluster = _connect(args.address)
    if args.id:
        info = cluster.info(args.id)
        if info is None:
            raise UnknownSubmission(f"the Ray cluster at {cluster.address} has no submission {args.id}")
    else:
        newest = cluster.list(limit=1)
        if not newest:
            raise UnknownSubmission(f"the Ray cluster at {cluster.address} has no lance-ray submissions")
        info = newest[0]
    print(format_info(info))
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    cluster = _connect(args.address)
    if args.follow:
        return follow_to_end(cluster, args.id)
    sys.stdout.write(cluster.logs(args.id))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    stopped = _connect(args.address).stop(args.id)
    print(f"{args.id}: {'stop requested' if stopped else 'already finished'}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    print(format_list(_connect(args.address).list(limit=args.limit, everything=args.all)))
    return EXIT_OK


SUBMIT_DESCRIPTION = """\
Stages the job file and its declared local inputs (at most 100 MB; files that table rows name must lie
in the folders the job's input.path entries name) as the job's working_dir, lists them, and runs
`lance-ray run` on the cluster; prints the submission id. Without --follow, exit status 0 means
the cluster accepted the submission. With --follow it streams the logs and exits as the run did
on the cluster (below)."""


def add_remote_commands(subparsers: argparse._SubParsersAction) -> None:
    """Registers submit / status / logs / stop / list on the `lance-ray` command."""
    p = subparsers.add_parser(
        "submit",
        help="run a job file on a Ray cluster (Ray Jobs API)",
        description=SUBMIT_DESCRIPTION,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job", help="the job file (YAML)")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream the logs until the run ends; exit with its status (0: succeeded)")
    p.add_argument("--submission-id", help="submission id to use (default: one chosen by Ray)")
    p.add_argument("--run-date", help="fills {run_date} in output paths")
    p.add_argument("--run-id", help="fills {run_id} in output paths")
    p.add_argument("--scheduled", action="store_true",
                   help="submit the run the job's schedule had due last (as a Kubernetes CronJob does): run "
                   "date, run id and submission id are that time's, so the cluster refuses it twice")
    add_submit_options(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser(
        "status",
        help="state of a submission (default: the newest lance-ray one)",
        description="Prints the state of a submission: status, start and end times, rows ok and failed (once "
        "it has finished), entrypoint. Without an id, the newest lance-ray submission.",
        epilog="exit status: 0 shown; 4 the cluster cannot be reached, or has no such submission.",
    )
    p.add_argument("id", nargs="?", help="submission id (default: the newest lance-ray submission)")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser(
        "logs",
        help="logs of a submission",
        description="Prints the logs of a submission so far; with --follow streams them until the run ends "
        "and exits as the run did.",
        epilog="exit status: 0 shown; with --follow, as the run ended on the cluster (0 succeeded, 1 some rows "
        "failed, 2 bad job file, 3 the run failed or was stopped); 4 the cluster cannot be reached, or has no "
        "such submission; 130 Ctrl-C stopped following (the run goes on).",
    )
    p.add_argument("id", help="submission id")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--follow", "-f", action="store_true", help="stream until the run ends")
    p.set_defaults(func=cmd_logs)

    p = subparsers.add_parser(
        "stop",
        help="stop a submission",
        description="Asks the cluster to stop a submission. Rows it committed are kept; submitting the job "
        "again skips them.",
        epilog="exit status: 0 stop requested, or the run had already finished; 4 the cluster cannot be "
        "reached, or has no such submission.",
    )
    p.add_argument("id", help="submission id")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.set_defaults(func=cmd_stop)

    p = subparsers.add_parser(
        "list",
        help="recent lance-ray submissions with status and row counts",
        description="Lists the newest submissions on the cluster (lance-ray jobs only unless --all), with "
        "their status, times and row counts.",
        epilog="exit status: 0 listed; 4 the cluster cannot be reached.",
    )
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--limit", type=int, default=20, help="newest N submissions (default 20)")
    p.add_argument("--all", action="store_true", help="include submissions that are not lance-ray jobs")
    p.set_defaults(func=cmd_list)
