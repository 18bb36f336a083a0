"""The `lance-ray` command.

    lance-ray validate JOB.yaml            check a job file (file:line:col errors, exit 2)
    lance-ray plan JOB.yaml                rows per step, checkpoint groups, actors, estimated GPU time
    lance-ray run JOB.yaml                 run it on a local Ray (or --address) and write the outputs
    lance-ray submit/status/logs/stop/list run on a remote Ray cluster through the Jobs API
    lance-ray schedule JOB.yaml            submit a job on its cron schedule
    lance-ray tiny-checkpoint DIR          write the tiny random checkpoint (official layout)

Exit status: 0 success, 1 some rows failed, 2 bad job file or arguments, 3 the run itself failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

EXIT_OK, EXIT_ROWS_FAILED, EXIT_BAD_JOB, EXIT_RUN_FAILED = 0, 1, 2, 3


def _load(path: str):
    from lance_ray.spec import JobSpecError, load_job

    try:
        return load_job(path, check_paths=True)
    except JobSpecError as err:
        print(err, file=sys.stderr)
        return None
    except FileNotFoundError:
        print(f"{path}: no such job file", file=sys.stderr)
        return None


def _warn_debug_backends(job) -> None:
    for family in ("image", "video"):
        if job.model_for(family).backend == "debug" and any(s.family == family for s in job.steps):
            print(f"WARNING: the {family} steps use the DEBUG backend: outputs are synthetic, not Lance outputs "
                  f"(models.{family}.backend: debug in the job file).", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    job = _load(args.job)
    if job is None:
        return EXIT_BAD_JOB
    print(f"{args.job}: ok ({len(job.steps)} step(s): {', '.join(s.name + '/' + s.task for s in job.steps)})")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from lance_ray.pipeline.planner import format_plan, make_plan
    from lance_ray.pipeline.runner import count_rows

    job = _load(args.job)
    if job is None:
        return EXIT_BAD_JOB
    _warn_debug_backends(job)
    print(format_plan(make_plan(job, args.gpus, count_rows(job))))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from lance_ray.pipeline.runner import SUMMARY_PREFIX, format_summary, new_run_id, run_job

    job = _load(args.job)
    if job is None:
        return EXIT_BAD_JOB
    _warn_debug_backends(job)
    if args.output:
        job = job.model_copy(update={"output": str(Path(args.output).resolve()) if "://" not in args.output
                                     else args.output})
    # {run_date} / {run_id} in output paths: scheduled runs pass them, a manual run gets today and a new id.
    run_id = args.run_id or new_run_id()
    run_date = args.run_date or datetime.now(timezone.utc).date().isoformat()
    job = job.with_run_context(run_date=run_date, run_id=run_id)
    try:
        summary = run_job(job, address=args.address, overwrite=args.overwrite, retry_failed=args.retry_failed,
                          progress=not args.no_progress,
                          run_id=run_id, verbose=args.verbose)
    except Exception as exc:  # the run itself broke (cluster, storage): rows are safe, say what happened
        logging.getLogger("lance_ray").debug("run failed", exc_info=True)  # the traceback with -v
        print(f"lance-ray run: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    print(format_summary(summary))
    print(SUMMARY_PREFIX + summary.to_json())  # one machine-readable line, read back by `lance-ray list`
    return EXIT_ROWS_FAILED if summary.failed else EXIT_OK


def cmd_tiny(args: argparse.Namespace) -> int:
    from lance_ray.models.lance.tiny import write_tiny_checkpoint

    root = write_tiny_checkpoint(Path(args.out), seed=args.seed, vae=args.vae)
    print(root)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from lance_ray import __version__

    parser = argparse.ArgumentParser(prog="lance-ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"lance-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a job file")
    p.add_argument("job")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="show the execution plan and estimated GPU time")
    p.add_argument("job")
    p.add_argument("--gpus", type=int, default=0, help="GPUs to plan for (default 0: CPU actors)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a job on Ray")
    p.add_argument("job")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="discard committed outputs and start clean")
    p.add_argument("--retry-failed", action="store_true", help="run rows that failed in an earlier run again")
    p.add_argument("--output", help="output root, overriding the job file's `output` (steps with their own "
                   "output.path keep it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--run-id", help="run id (fills {run_id} in output paths)")
    p.add_argument("--run-date", help="run date (fills {run_date} in output paths)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tiny-checkpoint", help="write the tiny random Lance checkpoint (official layout)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", choices=["small", "full", "none"], default="small")
    p.set_defaults(func=cmd_tiny)

    from lance_ray.cluster.remote import add_remote_commands
    from lance_ray.cluster.schedule import add_schedule_command

    add_remote_commands(sub)
    add_schedule_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
