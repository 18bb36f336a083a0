"""Run job files on an existing Ray cluster through Ray's Job Submission API.

This is the library behind `lance-ray submit / status / logs / stop / list` (lance_ray/cli/remote.py).
It raises `lance_ray.errors` types: ClusterError (and its subclasses here) when the cluster cannot
be reached or refuses a request, JobFileError (StagingError) when the job cannot travel.

`submit` stages the job file and the local files it reads into a fresh directory that travels as
the job's `working_dir` (at most 100 MB; anything bigger belongs on S3), then runs
`lance-ray run <job file>` on the cluster. The cluster is assumed to have lance-ray installed (the
image or `cluster.yaml`'s setup commands); SubmitOptions.pip installs it into the job's runtime env.

Only the job's declared inputs travel: the files its steps' `input.path` entries name (folders and
globs expanded) and the media that rows of those tables name. Every one of them must lie, symlinks
followed, inside an input folder: a folder an `input.path` entry names, a glob's folder, or the
folder of a file it names (that file itself is declared wherever it is). A row naming
`~/.aws/credentials` is refused, not uploaded, unless the submitter passes `allow_outside_inputs`
(`--allow-outside-inputs`). `submit` lists every file it ships.

What changes in the staged copy of the job file:
* local inputs are copied, keeping their layout relative to the job file, so relative paths and row
  ids stay the same;
* local output paths and local model folders become absolute paths: they are read and written on
  the cluster's own disks (a shared filesystem, or a single-node cluster); use s3:// otherwise;
* `s3://` and other URIs, hub model ids and `${ENV}` references stay as written. References are
  expanded on the cluster, from the cluster's environment;
* the `ray:` block is dropped: the job connects to the cluster it was submitted to.

Credentials are never written into the staged files. SubmitOptions.env_from_local forwards
variables from this process to the job's environment (Ray's runtime env); their values are never
printed.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, TypeVar

import yaml

from lance_ray import __version__
from lance_ray.errors import ClusterError, JobFileError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails

MAX_UPLOAD_BYTES = 100 * 1024 * 1024
JOB_TAG = "lance_ray_job"  # metadata key that marks a submission as a lance-ray job
DEFAULT_PIP = f"lance-ray-jobs=={__version__}"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_ENV_REFERENCE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")

T = TypeVar("T")


class ClusterUnreachable(ClusterError):
    """No Ray dashboard answered at the address, or the connection was lost (worth retrying later)."""


class UnknownSubmission(ClusterError):
    """The cluster has no submission with this id (a typo, or the cluster was restarted)."""


class StagingError(JobFileError):
    """The job's local files cannot travel with it (too big, unreadable), or a forwarded variable is unset."""


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


@dataclass
class _StepInputs:
    """The local files one step reads, and the folders its job file declares them in."""

    files: dict[Path, str]  # file -> why it is shipped: "input.path" or the row of a table naming it
    roots: list[Path]  # resolved: each declared folder, a glob's folder, a declared file's folder
    declared_files: set[Path]  # files input.path names one by one: shipped wherever they live

    def outside_roots(self) -> list[tuple[Path, str]]:
        """Files that resolve (symlinks followed) outside every root, unless declared one by one."""
        return [(f, why) for f, why in self.files.items()
                if f not in self.declared_files and not any(f.resolve().is_relative_to(r) for r in self.roots)]


def _root_of(path: str) -> Path:
    """The folder a declared input path stands for: itself, a glob's fixed part, or a file's folder."""
    parts = Path(path).parts
    magic = next((i for i, part in enumerate(parts) if glob.has_magic(part)), None)
    if magic is not None:
        return Path(*parts[:magic]).resolve()
    return Path(path).resolve() if os.path.isdir(path) else Path(path).resolve().parent


def _local_inputs(job) -> dict[int, _StepInputs]:
    """Per step index: the local files its `input.path` reads, including media that tables name."""
    from lance_ray.pipeline.sources import expand_paths, open_source
    from lance_ray.spec import is_uri

    found: dict[int, _StepInputs] = {}
    for index, step in enumerate(job.steps):
        if step.input.kind != "path":
            continue
        local = [p for p in step.input.path if not is_uri(p)]
        if not local:
            continue
        inputs = _StepInputs(files={}, roots=[_root_of(p) for p in local],
                             declared_files={Path(os.path.abspath(p)) for p in local
                                             if not glob.has_magic(p) and os.path.isfile(p)})
        files = expand_paths(local, step.input.format, step.spec.input_media)
        for file in files:
            inputs.files[Path(file.uri)] = "input.path"
        tables = [f.uri for f in files if f.kind not in ("image", "video")]
        if tables:  # media paths inside tables are relative to the table: ship those files too
            table_step = step.model_copy(update={"input": step.input.model_copy(update={"path": tables})})
            for row in open_source(table_step, job).iter_rows():
                for media in (row.get("image"), row.get("video")):
                    if media and not is_uri(media) and os.path.isfile(media):
                        inputs.files.setdefault(Path(os.path.abspath(media)), f"row {row['row_id']}")
        found[index] = inputs
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
    allow_outside_inputs: bool = False,
) -> StagedJob:
    """Copy a job file and its local inputs into `staging_dir` (see the module doc for the rules).

    Raises spec.JobSpecError for an invalid job file, and StagingError when the inputs are too big or
    include files outside the job's input folders (unless `allow_outside_inputs`).
    """
    from lance_ray.spec import is_uri, load_job

    job = load_job(job_path)
    source = Path(job.source_path)
    job_dir = source.parent
    text = source.read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    notes: list[str] = []

    try:
        inputs = _local_inputs(job)
    except ValueError as exc:  # sources.SourceError: an input that does not exist or cannot be read
        raise StagingError(str(exc)) from None
    outside = [(job.steps[i].name, f, why) for i, step_inputs in inputs.items()
               for f, why in step_inputs.outside_roots()]
    if outside and not allow_outside_inputs:
        listed = "; ".join(f"{f} (step {name}, {why})" for name, f, why in outside[:5])
        more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        raise StagingError(
            f"{len(outside)} file(s) the job would ship lie outside its input folders (those input.path names): "
            f"{listed}{more}. Move them under an input folder, or pass --allow-outside-inputs to ship them"
        )
    if outside:
        notes.append(f"shipping {len(outside)} file(s) from outside the job's input folders "
                     "(--allow-outside-inputs)")
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

    files = sorted({p.resolve() for step_inputs in inputs.values() for p in step_inputs.files})
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


def shipped_listing(staged: StagedJob, limit: int = 20) -> list[str]:
    """What a submission uploads, one file a line (the first `limit`, then a count of the rest)."""
    lines = [f"  {staged.job_file} (the job file)"] + [f"  {name}" for name in staged.files[:limit]]
    if len(staged.files) > limit:
        lines.append(f"  ... and {len(staged.files) - limit} more")
    return lines


# -------------------------------------------------------------------------------------- the cluster


@dataclass
class SubmitOptions:
    pip: str | None = None  # a pip requirement installed into the job's runtime env
    env_from_local: tuple[str, ...] = ()  # names of local environment variables forwarded to the job
    output: str | None = None  # replaces the job file's output root
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    allow_outside_inputs: bool = False  # ship files rows name outside the declared input folders

    def env_vars(self) -> dict[str, str]:
        """The forwarded variables with their current values; never print the values."""
        missing = [name for name in self.env_from_local if name not in os.environ]
        if missing:
            raise StagingError(
                f"variables to forward to the job (--env-from-local) are not set here: {', '.join(missing)}"
            )
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
    """A Ray cluster's Jobs API. Construction checks that the dashboard answers.

    Every method raises ClusterUnreachable when the connection fails, UnknownSubmission for a
    submission id the cluster does not know (except `info`, which returns None), and ClusterError
    when the cluster answers with an error.
    """

    def __init__(self, address: str | None = None):
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        # The SDK raises the builtin ConnectionError from its version check, requests' own for
        # later calls, and aiohttp's from the log stream (`follow`).
        self._connection_errors = (ConnectionError, requests.exceptions.ConnectionError,
                                   aiohttp.ClientConnectionError)
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
            raise ClusterError(_auth_hint(where, exc)) from None
        except (ValueError, RuntimeError) as exc:  # not a Ray dashboard, or a Ray too old for the Jobs API
            raise ClusterError(f"cannot use the Ray Jobs API at {where}: {exc}") from None
        self.address = where

    def _call(self, method: Callable[..., T], *args: object) -> T:
        """Calls the SDK, turning lost connections and refused tokens into our errors."""
        try:
            return method(*args)
        except self._connection_errors as exc:
            raise ClusterUnreachable(f"lost the Ray Jobs API at {self.address}: {exc}") from None
        except self._auth_error as exc:
            raise ClusterError(_auth_hint(self.address, exc)) from None

    def _knows(self, submission_id: str) -> bool:
        """Whether the cluster has a job with this submission id (or Ray job id).

        The SDK answers every failed request with a bare RuntimeError whose only clue is its text
        ("Request failed with status code 404: Job … does not exist."), so the error cannot tell an
        unknown id from a server-side failure without parsing prose. The cluster's job list can: it
        is typed data (JobDetails) from the same job table that get_job_info, get_job_logs and
        stop_job look ids up in, and it accepts both kinds of id as they do. Only the failure path
        pays for the listing.
        """
        try:
            jobs = self._call(self.client.list_jobs)
        except RuntimeError as exc:
            raise ClusterError(f"cannot list the jobs of the cluster at {self.address}: {exc}") from None
        return any(submission_id in (job.submission_id, job.job_id) for job in jobs)

    def _request_failed(self, submission_id: str, what: str, exc: Exception) -> ClusterError:
        """The error for a failed request about one submission: unknown id, or the cluster's own error."""
        if not self._knows(submission_id):
            return UnknownSubmission(f"the Ray cluster at {self.address} has no submission {submission_id}")
        return ClusterError(f"cannot {what} {submission_id}: {exc}")

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
                allow_outside_inputs=options.allow_outside_inputs,
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
                for line in shipped_listing(staged):
                    print(line, file=out)
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
                raise ClusterError(f"the cluster refused the submission: {exc}") from None

    def info(self, submission_id: str) -> RunInfo | None:
        """The submission's state; None when the cluster does not know it. Rows come from the logs."""
        try:
            details = self._call(self.client.get_job_info, submission_id)
        except RuntimeError as exc:
            error = self._request_failed(submission_id, "read submission", exc)
            if isinstance(error, UnknownSubmission):
                return None
            raise error from None
        return self._run_info(details)

    def _run_info(self, details: JobDetails) -> RunInfo:
        info = RunInfo(
            submission_id=details.submission_id or details.job_id or "",
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
            raise self._request_failed(submission_id, "read the logs of", exc) from None

    def follow(self, submission_id: str, out: TextIO) -> None:
        """Stream the logs to `out` until the run ends."""

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(submission_id):
                out.write(chunk)
                out.flush()

        import asyncio

        import aiohttp

        try:
            self._call(asyncio.run, tail())
        # RuntimeError: the stream broke off; ClientResponseError: the server refused to open it
        # (an unknown id among other reasons, which _request_failed tells apart).
        except (RuntimeError, aiohttp.ClientResponseError) as exc:
            raise self._request_failed(submission_id, "follow the logs of", exc) from None

    def stop(self, submission_id: str) -> bool:
        """Ask the cluster to stop a run; False when it had already ended."""
        try:
            return bool(self._call(self.client.stop_job, submission_id))
        except RuntimeError as exc:
            raise self._request_failed(submission_id, "stop", exc) from None

    def list(self, *, limit: int = 20, everything: bool = False) -> list[RunInfo]:
        """The newest submissions first (lance-ray runs only unless `everything`), rows where known."""
        try:
            jobs = self._call(self.client.list_jobs)
        except RuntimeError as exc:
            raise ClusterError(f"cannot list the jobs of the cluster at {self.address}: {exc}") from None
        jobs = [j for j in jobs if j.submission_id and (everything or JOB_TAG in (j.metadata or {}))]
        jobs.sort(key=lambda j: j.start_time or 0, reverse=True)
        return [self._run_info(j) for j in jobs[:limit]]
