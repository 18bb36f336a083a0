"""The `report` command: a self-contained HTML page of a run's results (lance_ray.pipeline.report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lance_ray.cli.exit_codes import EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from lance_ray.pipeline.report import write_report

    output = args.output if "://" in args.output else str(Path(args.output).resolve())
    print(write_report(output, dest=args.out, run_id=args.run, max_rows=args.max_rows))
    return EXIT_OK


def add_report_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="write an HTML page of a run's results",
        description="Writes one self-contained HTML page (images, clips and text embedded) of the newest run "
        "under OUTPUT, a job's output root: per-step counts, rows/s and time at the top; each row's output "
        "beside its input and prompt; filters for failed rows and their errors; a detail view with params "
        "and seed. It goes to OUTPUT/_runs/<run id>/report.html unless --out says otherwise; its path is "
        "printed.",
        epilog="exit status: 0 written; 2 no finished run under OUTPUT, or --out names a file that is not a "
        "lance-ray report; 3 it could not be written.",
    )
    p.add_argument("output", metavar="OUTPUT", help="the job's output root (local directory or s3://...)")
    p.add_argument("--run", metavar="RUN_ID", help="which run (default: the newest that finished)")
    p.add_argument("--out", metavar="FILE", help="where to write the page")
    p.add_argument("--max-rows", type=int, default=100,
                   help="rows shown per step, failed rows first (default 100)")
    p.set_defaults(func=cmd_report)
