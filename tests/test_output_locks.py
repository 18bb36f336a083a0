"""One run at a time per output: the lock in `__lance_ray__/lock`, locally (flock) and on S3 (conditional PUT)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lance_ray.io import storage
from lance_ray.pipeline.sinks import OutputLocked, locked_outputs
from lance_ray.pipeline.sinks import lock as lock_module
from lance_ray.pipeline.sinks.lock import OutputLock

REPO = Path(__file__).resolve().parents[1]


def test_a_second_holder_is_refused_with_the_holders_name(tmp_path: Path) -> None:
    output = str(tmp_path / "gen")
    with locked_outputs([output, output], "first-run"):  # the same output twice is one lock
        with pytest.raises(OutputLocked, match=r"is being written by run first-run \(pid \d+ on "):
            OutputLock(output, "second-run").acquire()
        holder = json.loads((tmp_path / "gen" / "__lance_ray__" / "lock").read_text())
        assert holder["run_id"] == "first-run" and holder["pid"] == os.getpid()
    with locked_outputs([output], "second-run"):  # released at the end of the first
        pass


def test_refusing_one_output_releases_those_already_taken(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with locked_outputs([b], "other"):
        with pytest.raises(OutputLocked), locked_outputs([a, b], "mine"):
            pass
        with locked_outputs([a], "third"):  # `a` was let go when `b` was refused
            pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    output = tmp_path / "out" / "gen"
    code = ("import time; from lance_ray.pipeline.sinks.lock import OutputLock; "
            f"lock = OutputLock({str(output)!r}, 'doomed'); lock.acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=f"pid {proc.pid}"):
            OutputLock(str(output), "second").acquire()
    finally:
        proc.kill()
        proc.wait()
    lock = OutputLock(str(output), "third")
    lock.acquire()  # the kernel let go of the killed holder's lock
    lock.release()


@pytest.fixture
def s3_output(s3_server: str) -> str:
    bucket = f"locks-{uuid.uuid4().hex[:8]}"
    storage.filesystem_for(f"s3://{bucket}")[0].mkdir(bucket)
    return f"s3://{bucket}/gen"


def test_s3_lock_is_created_conditionally_and_released(s3_output: str) -> None:
    first = OutputLock(s3_output, "first")
    first.acquire()
    try:
        with pytest.raises(OutputLocked, match="run first"):
            OutputLock(s3_output, "second").acquire()
        assert json.loads(storage.read_bytes(first.uri))["run_id"] == "first"
    finally:
        first.release()
    assert not storage.exists(first.uri)
    second = OutputLock(s3_output, "second")
    second.acquire()
    second.release()


def test_s3_stale_locks_are_taken_over_once(s3_output: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lock_uri = OutputLock(s3_output, "x").uri
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"run_id": "killed", "pid": int(dead.stdout), "host": socket.gethostname(), "since": "earlier",
             "heartbeat_at": time.time()}
    storage.write_bytes_atomic(lock_uri, json.dumps(stale).encode())
    taker = OutputLock(s3_output, "taker")
    taker.acquire()  # its holder is a dead process on this host
    assert json.loads(storage.read_bytes(lock_uri))["run_id"] == "taker"
    # A live holder elsewhere whose heartbeat stopped long ago is stale too; a fresh one is not.
    taker.release()
    elsewhere = {**stale, "host": "another-host", "pid": 1, "heartbeat_at": time.time()}
    storage.write_bytes_atomic(lock_uri, json.dumps(elsewhere).encode())
    with pytest.raises(OutputLocked, match="run killed"):
        OutputLock(s3_output, "impatient").acquire()
    monkeypatch.setattr(lock_module, "STALE_AFTER_S", -1.0)
    patient = OutputLock(s3_output, "patient")
    patient.acquire()
    patient.release()


def test_s3_heartbeat_keeps_the_lock_fresh(s3_output: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lock_module, "HEARTBEAT_S", 0.2)
    holder = OutputLock(s3_output, "beating")
    holder.acquire()
    try:
        first = json.loads(storage.read_bytes(holder.uri))["heartbeat_at"]
        deadline = time.time() + 30
        while json.loads(storage.read_bytes(holder.uri))["heartbeat_at"] == first and time.time() < deadline:
            time.sleep(0.1)
        assert json.loads(storage.read_bytes(holder.uri))["heartbeat_at"] > first
    finally:
        holder.release()


def test_s3_two_runs_taking_over_one_stale_lock_cannot_both_win(s3_output: str, monkeypatch) -> None:
    lock_uri = OutputLock(s3_output, "x").uri
    storage.write_bytes_atomic(lock_uri, json.dumps({"run_id": "dead", "host": "gone", "heartbeat_at": 0}).encode())
    monkeypatch.setattr(lock_module, "STALE_AFTER_S", 60.0)
    monkeypatch.setattr(storage, "modified_at", lambda entry: 0.0)  # last written long ago: stale
    slow, fast = OutputLock(s3_output, "slow"), OutputLock(s3_output, "fast")
    read = OutputLock._read_s3

    def read_then_lose_the_race(self, fs, path):
        seen = read(self, fs, path)
        if self is slow and fast._etag is None:
            fast.acquire()  # takes the stale lock over between slow's read and slow's swap
        return seen

    monkeypatch.setattr(OutputLock, "_read_s3", read_then_lose_the_race)
    try:
        with pytest.raises(OutputLocked, match="run fast"):
            slow.acquire()
        assert json.loads(storage.read_bytes(lock_uri))["run_id"] == "fast"
        slow.release()  # never held: must not remove fast's lock
        assert json.loads(storage.read_bytes(lock_uri))["run_id"] == "fast"
    finally:
        fast.release()
