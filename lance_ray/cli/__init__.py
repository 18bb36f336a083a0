"""The `lance-ray` command: the parser, and `main`, which runs one command and returns its exit code.

One module per group of commands: jobs.py (validate, plan, run, tiny-checkpoint), report.py (report),
remote.py (submit, status, logs, stop, list), schedule.py (schedule). Commands raise `lance_ray.errors` types;
exit_codes.py turns them into exit codes, in one table. Heavy imports (torch, Ray) happen inside the
commands, so `lance-ray --help` and `lance-ray validate` stay fast.
"""

from __future__ import annotations

import argparse
import logging
import warnings

from lance_ray.cli.exit_codes import EXIT_CODES_HELP, run_command
from lance_ray.cli.jobs import add_job_commands
from lance_ray.cli.quiet import ray_lines_hidden
from lance_ray.cli.remote import add_remote_commands
from lance_ray.cli.report import add_report_command
from lance_ray.cli.schedule import add_schedule_command

DESCRIPTION = """\
lance-ray runs ByteDance's Lance model (image and video captions, questions, generation and editing)
over datasets described by a YAML job file, on a local Ray or a Ray cluster. Outputs are Parquet
files (plus PNG/MP4 media), locally or on S3; rows already committed are skipped on the next run.

Run `lance-ray COMMAND --help` for a command's options."""


def build_parser() -> argparse.ArgumentParser:
    from lance_ray import __version__

    parser = argparse.ArgumentParser(
        prog="lance-ray",
        description=DESCRIPTION,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lance-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, Ray's own log lines, and tracebacks of failures")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_job_commands(subparsers)
    add_report_command(subparsers)
    add_remote_commands(subparsers)
    add_schedule_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # -v is lance-ray's own debug output. Other libraries stay at WARNING: botocore's debug log, for
    # one, prints every request's signed headers, access key id included.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lance_ray").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if not args.verbose:  # Ray's warnings are about Ray's internals, not about a lance-ray job
        warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    with ray_lines_hidden(enabled=not args.verbose):
        return run_command(args.command, args.func, args)
