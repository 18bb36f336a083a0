"""Run job files on an existing Ray cluster through Ray's Job Submission API.

    lance-ray submit job.yaml --address http://HEAD:8265 [--follow]
    lance-ray status [ID] | logs ID [--follow] | stop ID | list

`submit` stages the job file and the local files it reads into a fresh directory that travels as
the job's `working_dir` (at most 100 MB; anything bigger belongs on S3), then runs
`lance-ray run <job file>` on the cluster. The cluster is assumed to have lance-ray installed (the
image or `cluster.yaml`'s setup commands); `--pip` installs it into the job's runtime env instead.

What changes in the staged copy of the job file:
* local inputs (files, folders, globs, and media that tables reference) are copied, keeping their
  layout relative to the job file, so relative paths and row ids stay the same;
* local output paths and local model folders become absolute paths: they are read and written on
  the cluster's own disks (a shared filesystem, or a single-node cluster); use s3:// otherwise;
* `s3://` and other URIs, hub model ids and `${ENV}` references stay as written. References are
  expanded on the cluster, from the cluster's environment;
* the `ray:` block is dropped: the job connects to the cluster it was submitted to.

Credentials are never written into the staged files. `--env-from-local NAME` forwards one variable
from this shell to the job's environment (Ray's runtime env); its value is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import yaml

from lance_ray import __version__
from lance_ray.cli import EXIT_BAD_JOB, EXIT_OK, EXIT_RUN_FAILED

MAX_UPLOAD_BYTES = 100 * 1024 * 1024
JOB_TAG = "lance_ray_job"  # metadata key that marks a submission as a lance-ray job
DEFAULT_PIP = f"lance-ray-jobs=={__version__}"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_ENV_REFERENCE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")


class RemoteError(Exception):
    """Submitting or managing a remote run failed; the message says why and what to do."""


class ClusterUnreachable(RemoteError):
    """No Ray dashboard answered at the address (worth retrying later)."""


class StagingError(RemoteError):
    """The job's local files cannot travel with it (too big, unreadable)."""


# ------------------------------------------------------------------------------------------- staging


@dataclass
class StagedJob:
    root: Path  # the directory uploaded as the job's working_dir
    job_name: str
    job_file: str  # the staged job file, relative to `root`
    files: list[str]  # staged inputs, relative to `root`
    size_bytes: int
    notes: list[str] = field(default_factory=list)  # what the user should know about the staged copy


def _escape(value: str) -> str:
    """A literal string for the job file (`$` would start an ${ENV} reference)."""
    return value.replace("$", "$$")


def _local_input_files(job) -> dict[int, list[Path]]:
    """Per step index: the local files its `input.path` reads, including media that tables name."""
    from lance_ray.pipeline.sources import expand_paths, open_source
    from lance_ray.spec import is_uri

    found: dict[int, list[Path]] = {}
    for index, step in enumerate(job.steps):
        if step.input.kind != "path":
            continue
        local = [p for p in step.input.path if not is_uri(p)]
        if not local:
            continue
        files = expand_paths(local, step.input.format, step.spec.input_media)
        paths = [Path(f.uri) for f in files]
        tables = [f.uri for f in files if f.kind not in ("image", "video")]
        if tables:  # media paths inside tables are relative to the table: ship those files too
            table_step = step.model_copy(update={"input": step.input.model_copy(update={"path": tables})})
            for row in open_source(table_step, job).iter_rows():
                for media in (row.get("image"), row.get("video")):
                    if media and not is_uri(media) and os.path.isfile(media):
                        paths.append(Path(os.path.abspath(media)))
        found[index] = paths
    return found


def _rewrite_step_paths(raw_step: dict, resolved: list[str], job_dir: Path) -> None:
    """Local entries of a step's `input.path` become relative to the job file (URIs stay as written)."""
    from lance_ray.spec import is_uri

    written = raw_step["input"]["path"]
    written = [written] if isinstance(written, str) else list(written)
    raw_step["input"]["path"] = [
        original if is_uri(path) else _escape(Path(os.path.relpath(path, job_dir)).as_posix())
        for original, path in zip(written, resolved, strict=True)
    ]


def stage_job(
    job_path: str | Path,
    staging_dir: str | Path,
    *,
    output: str | None = None,
    forwarded_env: Sequence[str] = (),
    max_bytes: int = MAX_UPLOAD_BYTES,
) -> StagedJob:
    """Copy a job file and its local inputs into `staging_dir` (see the module doc for the rules).

    Raises spec.JobSpecError for an invalid job file and StagingError when the inputs are too big.
    """
    from lance_ray.spec import is_uri, load_job

    job = load_job(job_path)
    source = Path(job.source_path)
    job_dir = source.parent
    text = source.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    notes: list[str] = []

    try:
        inputs = _local_input_files(job)
    except ValueError as exc:  # sources.SourceError: an input that does not exist or cannot be read
        raise StagingError(str(exc)) from None
    for index, step in enumerate(job.steps):
        if index in inputs:
            _rewrite_step_paths(raw["steps"][index], step.input.path, job_dir)

    if output is not None:
        output = output if is_uri(output) else os.path.abspath(output)
        raw["output"] = _escape(output)
    elif not is_uri(job.output):
        raw["output"] = _escape(job.output)
    for index, step in enumerate(job.steps):
        if step.output.path is not None and not is_uri(step.output.path):
            written = raw["steps"][index]["output"]
            if isinstance(written, dict):
                written["path"] = _escape(step.output.path)
            else:
                raw["steps"][index]["output"] = _escape(step.output.path)
    root_output = output or job.output
    local_outputs = sorted(
        {
            s.output.path or os.path.join(root_output, s.name)
            for s in job.steps
            if not is_uri(s.output.path or root_output)
        }
    )
    if local_outputs:
        notes.append(
            "outputs are local paths, written on the cluster's own disks: "
            f"{', '.join(local_outputs)} (use an s3:// output, or --output, for a multi-node cluster)"
        )

    for family in ("image", "video"):
        model = job.model_for(family)
        written = (raw.get("models") or {}).get(family)
        if model.kind == "local" and written is not None:
            if isinstance(written, dict):
                written["source"] = _escape(model.source)
            else:
                raw["models"][family] = _escape(model.source)
            notes.append(
                f"models.{family}.source is a local folder; it is read from {model.source} on the "
                "cluster's nodes (checkpoints are not uploaded)"
            )
    if raw.pop("ray", None) is not None:
        notes.append("the job file's `ray:` block is ignored: the job runs on the cluster it is submitted to")
    unforwarded = sorted(set(_ENV_REFERENCE.findall(text)) - set(forwarded_env))
    if unforwarded:
        notes.append(
            f"the job file reads {', '.join('${' + n + '}' for n in unforwarded)}: these come from "
            "the cluster's environment (forward one from here with --env-from-local NAME)"
        )

    files = sorted({p.resolve() for paths in inputs.values() for p in paths})
    base = Path(os.path.commonpath([job_dir, *(f.parent for f in files)]))
    sizes = {f: f.stat().st_size for f in files}
    total = sum(sizes.values()) + source.stat().st_size
    if total > max_bytes:
        biggest = sorted(sizes.items(), key=lambda item: -item[1])[:5]
        raise StagingError(
            f"the job's local inputs total {total / 1e6:.1f} MB, more than the {max_bytes / 1e6:.0f} MB that "
            f"may travel with a submission (largest: {', '.join(f'{p} {s / 1e6:.1f} MB' for p, s in biggest)}). "
            "Put the inputs on S3 (or storage the cluster can read) and reference them by URI in the job file."
        )

    root = Path(staging_dir)
    staged_files = []
    for file in files:
        rel = file.relative_to(base)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, root / rel)
        staged_files.append(rel.as_posix())
    job_rel = source.relative_to(base)
    (root / job_rel).parent.mkdir(parents=True, exist_ok=True)
    header = f"# Staged by lance-ray submit from {source.name}; local paths rewritten for the cluster.\n"
    (root / job_rel).write_text(
        header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8"
    )
    return StagedJob(
        root=root,
        job_name=job.name,
        job_file=job_rel.as_posix(),
        files=staged_files,
        size_bytes=total,
        notes=notes,
    )


# -------------------------------------------------------------------------------------- the cluster


@dataclass
class SubmitOptions:
    pip: str | None = None  # a pip requirement installed into the job's runtime env
    env_from_local: tuple[str, ...] = ()  # names of local environment variables forwarded to the job
    output: str | None = None  # replaces the job file's output root
    max_upload_bytes: int = MAX_UPLOAD_BYTES

    def env_vars(self) -> dict[str, str]:
        """The forwarded variables with their current values; never print the values."""
        missing = [name for name in self.env_from_local if name not in os.environ]
        if missing:
            raise RemoteError(f"--env-from-local: not set in this environment: {', '.join(missing)}")
        return {name: os.environ[name] for name in self.env_from_local}


@dataclass
class RunInfo:
    """One submission as the cluster reports it (rows only for finished lance-ray runs)."""

    submission_id: str
    status: str
    job_name: str | None
    entrypoint: str
    message: str | None
    start_time: datetime | None
    end_time: datetime | None
    metadata: dict[str, str]
    runtime_env: dict
    driver_exit_code: int | None = None
    rows_ok: int | None = None
    rows_failed: int | None = None


def parse_summary(logs: str) -> dict | None:
    """The runner's final summary (the last `LANCE_RAY_SUMMARY {json}` line of a run's logs)."""
    from lance_ray.pipeline.runner import SUMMARY_PREFIX

    for line in reversed(logs.splitlines()):
        if line.startswith(SUMMARY_PREFIX):
            try:
                return json.loads(line[len(SUMMARY_PREFIX) :])
            except json.JSONDecodeError:
                return None
    return None


def mask_env(env_vars: dict[str, str]) -> dict[str, str]:
    return {name: "***" for name in env_vars}


def _time(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, timezone.utc) if ms else None


def _auth_hint(address: str, exc: Exception) -> str:
    return (
        f"the Ray cluster at {address} uses token authentication: run with RAY_AUTH_MODE=token and the "
        f"cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token ({exc})"
    )


class RemoteCluster:
    """A Ray cluster's Jobs API. Construction checks that the dashboard answers."""

    def __init__(self, address: str | None = None):
        import requests
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        self._connection_errors = (ConnectionError, requests.exceptions.ConnectionError)
        self._auth_error = AuthenticationError
        where = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "auto"
        try:
            self.client = JobSubmissionClient(address)
        except self._connection_errors as exc:
            raise ClusterUnreachable(
                f"cannot reach the Ray Jobs API at {where} ({exc}); pass the dashboard address of a running "
                "cluster, e.g. --address http://HEAD:8265 (`ray dashboard cluster.yaml` forwards it locally)"
            ) from None
        except AuthenticationError as exc:
            raise RemoteError(_auth_hint(where, exc)) from None
        except (ValueError, RuntimeError) as exc:
            raise RemoteError(f"cannot use the Ray Jobs API at {where}: {exc}") from None
        self.address = where

    def _call(self, method, *args):
        try:
            return method(*args)
        except self._connection_errors as exc:
            raise ClusterUnreachable(f"lost the Ray Jobs API at {self.address}: {exc}") from None
        except self._auth_error as exc:
            raise RemoteError(_auth_hint(self.address, exc)) from None

    def submit(
        self,
        job_path: str | Path,
        options: SubmitOptions | None = None,
        *,
        submission_id: str | None = None,
        run_date: str | None = None,
        run_id: str | None = None,
        metadata: dict[str, str] | None = None,
        out: TextIO | None = None,
    ) -> str:
        """Stage and submit a job file; returns the submission id. Notes about staging go to `out`."""
        import shlex

        options = options or SubmitOptions()
        env_vars = options.env_vars()
        with tempfile.TemporaryDirectory(prefix="lance-ray-submit-") as staging:
            staged = stage_job(
                job_path,
                staging,
                output=options.output,
                forwarded_env=options.env_from_local,
                max_bytes=options.max_upload_bytes,
            )
            command = ["lance-ray", "run", staged.job_file, "--no-progress"]
            if run_date:
                command += ["--run-date", run_date]
            if run_id:
                command += ["--run-id", run_id]
            runtime_env: dict = {"working_dir": str(staged.root)}
            if options.pip:
                runtime_env["pip"] = [options.pip]
            if env_vars:
                runtime_env["env_vars"] = env_vars
            tags = {
                JOB_TAG: staged.job_name,
                "lance_ray_version": __version__,
                "job_file": Path(job_path).name,
                **(metadata or {}),
            }
            if out is not None:
                for note in staged.notes:
                    print(f"note: {note}", file=out)
                forwarded = ", ".join(f"{k}={v}" for k, v in mask_env(env_vars).items())
                print(
                    f"staged {len(staged.files)} input file(s), {staged.size_bytes / 1e6:.2f} MB"
                    + (f"; forwarding {forwarded}" if forwarded else ""),
                    file=out,
                )
            try:
                return self._call(
                    lambda: self.client.submit_job(
                        entrypoint=shlex.join(command),
                        runtime_env=runtime_env,
                        metadata=tags,
                        submission_id=submission_id,
                    )
                )
            except RuntimeError as exc:  # the cluster refused it (duplicate id, bad runtime env …)
                raise RemoteError(f"the cluster refused the submission: {exc}") from None

    def info(self, submission_id: str) -> RunInfo | None:
        """The submission's state; None when the cluster does not know it. Rows come from the logs."""
        try:
            details = self._call(self.client.get_job_info, submission_id)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                return None
            raise RemoteError(f"cannot read submission {submission_id}: {exc}") from None
        info = RunInfo(
            submission_id=details.submission_id or submission_id,
            status=str(details.status.value),
            job_name=(details.metadata or {}).get(JOB_TAG),
            entrypoint=details.entrypoint,
            message=details.message,
            start_time=_time(details.start_time),
            end_time=_time(details.end_time),
            metadata=dict(details.metadata or {}),
            runtime_env=dict(details.runtime_env or {}),
            driver_exit_code=details.driver_exit_code,
        )
        if info.job_name and info.status in TERMINAL:
            summary = parse_summary(self.logs(info.submission_id))
            if summary is not None:
                info.rows_ok = sum(step["ok"] for step in summary["steps"])
                info.rows_failed = summary["failed"]
        return info

    def logs(self, submission_id: str) -> str:
        try:
            return self._call(self.client.get_job_logs, submission_id)
        except RuntimeError as exc:
            raise RemoteError(f"cannot read the logs of {submission_id}: {exc}") from None

    def follow(self, submission_id: str, out: TextIO) -> None:
        """Stream the logs to `out` until the run ends."""

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(submission_id):
                out.write(chunk)
                out.flush()

        try:
            asyncio.run(tail())
        except RuntimeError as exc:
            raise RemoteError(f"cannot follow the logs of {submission_id}: {exc}") from None

    def stop(self, submission_id: str) -> bool:
        """Ask the cluster to stop a run; False when it had already ended."""
        try:
            return bool(self._call(self.client.stop_job, submission_id))
        except RuntimeError as exc:
            raise RemoteError(f"cannot stop {submission_id}: {exc}") from None

    def list(self, *, limit: int = 20, everything: bool = False) -> list[RunInfo]:
        """The newest submissions first (lance-ray runs only unless `everything`), rows where known."""
        try:
            jobs = self._call(self.client.list_jobs)
        except RuntimeError as exc:
            raise RemoteError(f"cannot list the cluster's jobs: {exc}") from None
        jobs = [j for j in jobs if j.submission_id and (everything or JOB_TAG in (j.metadata or {}))]
        jobs.sort(key=lambda j: j.start_time or 0, reverse=True)
        return [info for j in jobs[:limit] if (info := self.info(j.submission_id)) is not None]


# ---------------------------------------------------------------------------------------------- CLI

_EXIT_FOR_STATUS = {"SUCCEEDED": EXIT_OK, "STOPPED": EXIT_RUN_FAILED}


def exit_code_for(info: RunInfo) -> int:
    """A finished run's exit status: 0 when it succeeded, else `lance-ray run`'s own exit code when
    the cluster reports it (1 some rows failed, 2 bad job file, 3 the run failed), else 3."""
    if info.status in _EXIT_FOR_STATUS:
        return _EXIT_FOR_STATUS[info.status]
    return info.driver_exit_code if info.driver_exit_code in (1, 2, 3) else EXIT_RUN_FAILED


def _fmt_time(moment: datetime | None) -> str:
    return moment.astimezone().isoformat(timespec="seconds") if moment else "-"


def format_info(info: RunInfo) -> str:
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
    pip = args.pip_requirement or (DEFAULT_PIP if args.pip else None)
    options = SubmitOptions(pip=pip, env_from_local=tuple(args.env_from_local), output=args.output)
    options.env_vars()  # a variable that is not set fails now, not at the first submission
    return options


def add_submit_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `submit` and `schedule`."""
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


def cmd_submit(args: argparse.Namespace) -> int:
    from lance_ray.spec import JobSpecError, load_job

    try:
        load_job(args.job, check_paths=True)  # a bad job file fails here, before any network
        options = submit_options_from_args(args)
        cluster = RemoteCluster(args.address)
        submission_id = cluster.submit(
            args.job,
            options,
            submission_id=args.submission_id,
            run_date=args.run_date,
            run_id=args.run_id,
            out=sys.stderr,
        )
    except JobSpecError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_JOB
    except RemoteError as exc:
        print(f"lance-ray submit: {exc}", file=sys.stderr)
        return EXIT_BAD_JOB
    print(submission_id)
    if not args.follow:
        print(
            f"follow it with: lance-ray logs {submission_id} --follow"
            + (f" --address {args.address}" if args.address else ""),
            file=sys.stderr,
        )
        return EXIT_OK
    return _follow_to_end(cluster, submission_id)


def _follow_to_end(cluster: RemoteCluster, submission_id: str) -> int:
    try:
        cluster.follow(submission_id, sys.stdout)
        info = cluster.info(submission_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the run goes on (lance-ray stop {submission_id} ends it)", file=sys.stderr
        )
        return 130
    except RemoteError as exc:
        print(f"lance-ray: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    if info is None:
        print(f"lance-ray: the cluster no longer knows {submission_id}", file=sys.stderr)
        return EXIT_RUN_FAILED
    print(f"{submission_id}: {info.status}", file=sys.stderr)
    return exit_code_for(info)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        cluster = RemoteCluster(args.address)
        if args.id:
            info = cluster.info(args.id)
        else:
            newest = cluster.list(limit=1)
            info = newest[0] if newest else None
    except RemoteError as exc:
        print(f"lance-ray status: {exc}", file=sys.stderr)
        return EXIT_BAD_JOB
    if info is None:
        print(
            f"lance-ray status: {'no submission ' + args.id if args.id else 'no lance-ray submissions'} "
            f"on {cluster.address}",
            file=sys.stderr,
        )
        return EXIT_BAD_JOB
    print(format_info(info))
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    try:
        cluster = RemoteCluster(args.address)
        if not args.follow:
            sys.stdout.write(cluster.logs(args.id))
            return EXIT_OK
    except RemoteError as exc:
        print(f"lance-ray logs: {exc}", file=sys.stderr)
        return EXIT_BAD_JOB
    return _follow_to_end(cluster, args.id)


def cmd_stop(args: argparse.Namespace) -> int:
    try:
        stopped = RemoteCluster(args.address).stop(args.id)
    except RemoteError as exc:
        print(f"lance-ray stop: {exc}", file=sys.stderr)
        return EXIT_BAD_JOB
    print(f"{args.id}: {'stop requested' if stopped else 'already finished'}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    try:
        infos = RemoteCluster(args.address).list(limit=args.limit, everything=args.all)
    except RemoteError as exc:
        print(f"lance-ray list: {exc}", file=sys.stderr)
        return EXIT_BAD_JOB
    print(format_list(infos))
    return EXIT_OK


def add_remote_commands(subparsers: argparse._SubParsersAction) -> None:
    """Registers submit / status / logs / stop / list on the `lance-ray` command."""
    address_help = "Ray dashboard address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"

    p = subparsers.add_parser(
        "submit",
        help="run a job file on a Ray cluster (Ray Jobs API)",
        description="Stages the job file and its local inputs (at most 100 MB) as the "
        "job's working_dir and runs `lance-ray run` on the cluster.",
    )
    p.add_argument("job")
    p.add_argument("--address", help=address_help)
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="stream the logs until the run ends; exit with its status (0: succeeded)",
    )
    p.add_argument("--submission-id", help="submission id to use (default: one chosen by Ray)")
    p.add_argument("--run-date", help="fills {run_date} in output paths")
    p.add_argument("--run-id", help="fills {run_id} in output paths")
    add_submit_options(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("status", help="state of a submission (default: the newest lance-ray one)")
    p.add_argument("id", nargs="?")
    p.add_argument("--address", help=address_help)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("logs", help="logs of a submission")
    p.add_argument("id")
    p.add_argument("--address", help=address_help)
    p.add_argument("--follow", "-f", action="store_true", help="stream until the run ends")
    p.set_defaults(func=cmd_logs)

    p = subparsers.add_parser("stop", help="stop a submission")
    p.add_argument("id")
    p.add_argument("--address", help=address_help)
    p.set_defaults(func=cmd_stop)

    p = subparsers.add_parser("list", help="recent lance-ray submissions with status and row counts")
    p.add_argument("--address", help=address_help)
    p.add_argument("--limit", type=int, default=20, help="newest N submissions (default 20)")
    p.add_argument("--all", action="store_true", help="include submissions that are not lance-ray jobs")
    p.set_defaults(func=cmd_list)
