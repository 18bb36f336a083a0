"""Commands that work on a job file here: validate, plan, run, export, and tiny-checkpoint.

The pipeline, the model and Ray are imported inside the commands, so that `lance-ray --help` and
`lance-ray validate` never load torch or Ray.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from lance_ray.cli.exit_codes import EXIT_CODES_HELP, EXIT_OK, EXIT_ROWS_FAILED
from lance_ray.errors import JobFileError
from lance_ray.models.lance import GPU_SPEED

if TYPE_CHECKING:
    from lance_ray.spec import Job, SpecProblem

GPU_TYPES = tuple(GPU_SPEED)


def load_job_file(path: str, notes: list[SpecProblem] | None = None) -> Job:
    """The job file, validated, with local input paths checked; raises JobFileError (spec.JobSpecError).
    `notes` receives the notes of a valid file (spec.load_job)."""
    from lance_ray.spec import load_job

    try:
        return load_job(path, check_paths=True, notes=notes)
    except FileNotFoundError:
        raise JobFileError(f"{path}: no such job file") from None
    except OSError as exc:  # a directory, no permission …
        raise JobFileError(f"{path}: cannot read the job file: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ScheduledRun:
    """The run a job's schedule had due last: what `--scheduled` fills in, as the built-in scheduler would."""

    scheduled_for: datetime
    run_date: str
    run_id: str
    submission_id: str


def scheduled_run(job: Job, now: datetime | None = None) -> ScheduledRun:
    from lance_ray.cluster.schedule import latest_due, run_date_for, run_id_for, submission_id_for

    if job.schedule is None:
        raise JobFileError(f"--scheduled: the job {job.name} has no `schedule:` block")
    moment = latest_due(job.schedule, now or datetime.now(timezone.utc))
    return ScheduledRun(moment, run_date_for(job.schedule, moment), run_id_for(moment),
                        submission_id_for(job.name, moment))


def warn_debug_backends(job: Job) -> None:
    for family in ("image", "video"):
        if job.model_for(family).backend == "debug" and any(s.family == family for s in job.steps):
            print(f"WARNING: the {family} steps use the DEBUG backend: outputs are synthetic, not Lance "
                  f"outputs (models.{family}.backend: debug in the job file).", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    notes: list[SpecProblem] = []
    job = load_job_file(args.job, notes)
    for note in notes:  # file:line:col: note: ... / warning: ...; not errors
        print(note, file=sys.stderr)
    print(f"{args.job}: ok ({len(job.steps)} step(s): {', '.join(s.name + '/' + s.task for s in job.steps)})")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from lance_ray.pipeline.planner import format_plan, make_plan
    from lance_ray.pipeline.runner import count_step_rows

    job = load_job_file(args.job)
    warn_debug_backends(job)
    counts = count_step_rows(job)  # "~" in the plan: estimated from the head of a large remote table
    rows = {name: None if count is None else count.rows for name, count in counts.items()}
    estimated = frozenset(name for name, count in counts.items() if count is not None and not count.exact)
    print(format_plan(make_plan(job, args.gpus, rows, estimated, args.gpu_type), gpu_price=args.gpu_price))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from lance_ray.pipeline.runner import SUMMARY_PREFIX, format_summary, new_run_id, run_job, shutdown_ray

    job = load_job_file(args.job)
    warn_debug_backends(job)
    if args.metrics_port is not None and (args.address or job.ray.address or os.environ.get("RAY_ADDRESS")):
        raise JobFileError("--metrics-port is for a local Ray; a cluster's nodes export metrics on the port "
                           "their `ray start --metrics-export-port` names")
    if args.output:
        output = args.output if "://" in args.output else str(Path(args.output).resolve())
        job = job.model_copy(update={"output": output})
    # {run_date} / {run_id} in output paths: scheduled runs pass them (or ask for them with --scheduled),
    # a manual run gets today and a new id.
    scheduled = scheduled_run(job) if args.scheduled else None
    run_id = args.run_id or (scheduled.run_id if scheduled else new_run_id())
    run_date = args.run_date or (scheduled.run_date if scheduled else datetime.now(timezone.utc).date().isoformat())
    job = job.with_run_context(run_date=run_date, run_id=run_id)
    ray_was_running = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # e.g. a test's own Ray
    try:
        summary = run_job(job, address=args.address, overwrite=args.overwrite, retry_failed=args.retry_failed,
                          progress=not args.no_progress, run_id=run_id, verbose=args.verbose,
                          metrics_port=args.metrics_port)
    finally:
        if not ray_was_running:  # here, while Ray's lines are still kept off the terminal
            shutdown_ray()
    print(format_summary(summary))
    print(SUMMARY_PREFIX + summary.to_json())  # one machine-readable line, read back by `lance-ray list`
    return EXIT_ROWS_FAILED if summary.failed else EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from lance_ray.pipeline.export import export_step, format_report, suite_step

    job = load_job_file(args.job)
    if args.output:
        output = args.output if "://" in args.output else str(Path(args.output).resolve())
        job = job.model_copy(update={"output": output})
    report = export_step(job, suite_step(job, args.step), args.to)
    for line in format_report(report):
        print(line)
    return EXIT_ROWS_FAILED if report.problems else EXIT_OK


def cmd_tiny_checkpoint(args: argparse.Namespace) -> int:
    from lance_ray.models.lance import write_tiny_checkpoint

    print(write_tiny_checkpoint(Path(args.out), seed=args.seed, vae=args.vae))
    return EXIT_OK


RUN_DESCRIPTION = """\
Runs a job file on a local Ray (or the cluster at --address) with progress bars, then prints a
summary table. Each batch of rows is committed as it finishes, so a run that is interrupted or
fails keeps its committed rows, and running it again skips them."""


def add_job_commands(subparsers: argparse._SubParsersAction) -> None:
    """Registers validate / plan / run / export / tiny-checkpoint on the `lance-ray` command."""
    p = subparsers.add_parser(
        "validate",
        help="check a job file",
        description="Checks a job file: its schema, its templates, and that local input paths exist, without "
        "starting Ray or loading the model. Every problem is printed as file:line:col: message.",
        epilog="exit status: 0 the job file is valid; 2 it is not (every problem printed).",
    )
    p.add_argument("job", help="the job file (YAML)")
    p.set_defaults(func=cmd_validate)

    p = subparsers.add_parser(
        "plan",
        help="show the execution plan and estimated GPU time",
        description="Prints the rows per step, the checkpoint groups, the actors per group and the estimated "
        "GPU time of a job file (and its price with --gpu-price), without running anything: it neither "
        "starts Ray nor loads the model. A row's cost grows with its denoising steps, output size and frames, "
        "or its new tokens; the per-task costs are fitted to the benchmarks in benchmarks/results/.",
        epilog="exit status: 0 planned; 2 bad job file or arguments.",
    )
    p.add_argument("job", help="the job file (YAML)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs to plan for (default 0: CPU actors)")
    p.add_argument("--gpu-type", choices=GPU_TYPES, default="h100", help="GPU the time is estimated for "
                   "(default h100)")
    p.add_argument("--gpu-price", type=float, metavar="DOLLARS", help="price of one GPU-hour: also print the "
                   "estimated cost, e.g. --gpu-price 2.5")
    p.set_defaults(func=cmd_plan)

    p = subparsers.add_parser(
        "run",
        help="run a job file on Ray and write its outputs",
        description=RUN_DESCRIPTION,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job", help="the job file (YAML)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="discard committed outputs and start clean")
    p.add_argument("--retry-failed", action="store_true", help="run rows that failed in an earlier run again")
    p.add_argument("--output", help="output root, overriding the job file's `output` (steps with their own "
                   "output.path keep it)")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="a local run's Ray exports Prometheus metrics at http://127.0.0.1:PORT/metrics "
                   "(docs/deploy.md#metrics)")
    p.add_argument("--run-id", help="run id (fills {run_id} in output paths)")
    p.add_argument("--run-date", help="run date (fills {run_date} in output paths)")
    p.add_argument("--scheduled", action="store_true", help="this is the run the job's schedule had due last "
                   "(a Kubernetes RayCronJob runs it so): run date and run id are that time's")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser(
        "export",
        help="lay out a benchmark suite step's outputs for the benchmark's evaluator",
        description="Copies the committed outputs of a step that reads a benchmark suite (input.suite: geneval, "
        "dpg, vbench, gedit) into the layout that benchmark's evaluator reads (specs/README.md, 'Benchmark "
        "suites'). It never overwrites a file it did not write. Exits 1 when some cases could not be exported "
        "(they are listed).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("job", help="the job file (YAML)")
    p.add_argument("--to", required=True, help="the folder to lay the files out in (created if missing)")
    p.add_argument("--step", help="the suite step to export (default: the job's only suite step)")
    p.add_argument("--output", help="the output root the job ran with, if `run --output` overrode it")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "tiny-checkpoint",
        help="write the tiny random Lance checkpoint (official layout)",
        description="Writes a tiny Lance checkpoint with random weights in the official Hugging Face layout, "
        "for tests and the CPU quickstart (jobs name it `lance-tiny`). Prints the directory.",
        epilog="exit status: 0 written; 3 it could not be written.",
    )
    p.add_argument("out", help="directory to write it to")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--vae", choices=["small", "full", "none"], default="small",
                   help="which VAE to include (default small)")
    p.set_defaults(func=cmd_tiny_checkpoint)
