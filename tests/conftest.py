"""Shared test fixtures: one local Ray per session, one Ray head (Jobs API, metrics) per session, the tiny
checkpoint, a local S3 server, and `wait_for`: on a busy machine tests wait for readiness, never a fixed time."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

# Keep Ray quiet and local; never let a test reach a real cloud endpoint.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


# How long a test waits for something that only a busy machine makes slow (a Ray start, a submitted job):
# generous, since waiting ends as soon as the thing is ready.
READY_TIMEOUT_S = 600

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float = READY_TIMEOUT_S, what: str = "condition") -> T:
    """Polls `predicate` until it returns something true, and returns that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def ray_local(s3_server: str) -> Iterator[None]:
    """One local Ray for the whole session (starting Ray costs seconds).

    Depends on `s3_server` so that Ray's workers inherit its endpoint and credentials.
    """
    import ray

    # Logical CPUs may exceed physical cores: GPU-less actors and CPU tasks must not starve each other.
    ray.init(num_cpus=6, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Lance checkpoint in the official layout (written once per session)."""
    from lance_ray.models.lance.tiny import ensure_tiny_checkpoint

    cache = Path(os.environ.get("LANCE_RAY_CACHE", tmp_path_factory.mktemp("lance-cache")))
    return ensure_tiny_checkpoint(cache)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on localhost: real HTTP for every s3:// path in the tests."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                             "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ------------------------------------------------------------------------------ one Ray head per session


@dataclass(frozen=True)
class RayHead:
    dashboard: str  # http://127.0.0.1:PORT: the Jobs API (`lance-ray submit --address`)
    gcs: str  # 127.0.0.1:PORT: what a driver connects to (`lance-ray run --address`)
    metrics: str  # http://127.0.0.1:PORT/metrics: the node's Prometheus endpoint
    temp_dir: Path


def _session_processes(session_id: int) -> list[int]:
    """Pids of the processes whose session id is `session_id` (all started by our `ray start`)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session …
        if int(fields[3]) == session_id:
            pids.append(int(entry))
    return pids


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def head_env(temp: Path) -> dict[str, str]:
    """The environment of the head and of drivers that connect to it (`lance-ray run --address`)."""
    env = {**os.environ, "RAY_TMPDIR": str(temp), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # Ray 2.60 turns token auth on for `ray start` when ~/.ray/auth_token exists (any local `ray.init()`
    # writes one); this head's clients are this test session only, so it runs without.
    env["RAY_AUTH_MODE"] = "disabled"
    return env


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """A private Ray head for the session: `ray start --head --block` in a session of its own, with its own
    `--temp-dir` and free ports, so `ray.init()` elsewhere never finds it. Ready means: the dashboard answers,
    a first submitted job has run (the job agent is up) and the metrics endpoint answers.

    Teardown sends SIGTERM to the blocking `ray start` (which stops what it started) and SIGKILLs any process
    of its session still left. `ray stop` is never used: it stops every Ray on the machine.
    """
    temp = Path(tempfile.mkdtemp(prefix="lrh", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port, dashboard, client, agent, metrics = (free_port() for _ in range(5))
    log = temp / "ray-start.log"
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=4",
        f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}", "--disable-usage-stats",
    ]  # fmt: skip
    with open(log, "w") as log_file:
        proc = subprocess.Popen(command, env=head_env(temp), stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics}/metrics", temp)

    def up(url: str) -> bool:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        return _http_ok(url)

    try:
        wait_for(lambda: up(head.dashboard + "/api/version"), what=f"the Ray dashboard at {head.dashboard}")
        from ray.job_submission import JobStatus, JobSubmissionClient

        first: dict[str, object] = {}  # the client and the submission id of a first trivial job

        def a_job_ran() -> bool:
            try:
                if "client" not in first:
                    first["client"] = JobSubmissionClient(head.dashboard)
                client = first["client"]
                if "job" not in first:
                    first["job"] = client.submit_job(entrypoint="true")
                status = client.get_job_status(first["job"])
            except (RuntimeError, OSError):  # e.g. "No available agent to submit job, please try again later"
                return False
            if status in (JobStatus.FAILED, JobStatus.STOPPED):  # the agent was not ready for it: another
                del first["job"]
            return status == JobStatus.SUCCEEDED

        wait_for(a_job_ran, what="a first job to run on the head (its job agent is up)")
        wait_for(lambda: up(head.metrics), what=f"the metrics endpoint {head.metrics}")
        yield head
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):  # a graceful stop can drain for 30 s: don't wait
            proc.wait(timeout=5)
        for pid in _session_processes(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def jobs_head(ray_head: RayHead) -> str:
    """The Jobs API address of the session's Ray head."""
    return ray_head.dashboard
