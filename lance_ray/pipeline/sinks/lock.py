"""One run at a time per output: `__lance_ray__/lock` in each step's output, held for the whole run.

Local outputs: an exclusive `flock` on the lock file. The kernel releases it however the holder ends
(SIGKILL included), so a killed run never leaves a stale lock; the file's content names the holder
(host, pid, run id, since) for the message a second run prints. (`flock` holds on local disks and on
NFS v4; on other shared filesystems it may not.)

S3: the lock object is created with a conditional PUT (`If-None-Match: *`), so of two runs only one
can create it. Its holder rewrites it every `HEARTBEAT_S`. A lock whose holder is a dead process on
this host, or that has not been rewritten for `STALE_AFTER_S`, is stale: it is taken over with a
compare-and-swap PUT (`If-Match: <its ETag>`), so of two runs taking over the same stale lock only
one wins. Other object stores have no conditional PUT in fsspec: there the lock is checked, then
written — it stops a second run started later, not two started in the same instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from lance_ray.errors import RunError
from lance_ray.io import storage
from lance_ray.pipeline.sinks.base import BOOKKEEPING_DIR

LOCK_NAME = "lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class OutputLocked(RunError):
    """Another run is writing this output."""


class OutputLock:
    def __init__(self, output_uri: str, run_id: str):
        self.output_uri = output_uri
        self.uri = storage.join_uri(output_uri, BOOKKEEPING_DIR, LOCK_NAME)
        self.run_id = run_id
        self._file: Any = None  # local: the open, flocked file
        self._etag: str | None = None  # S3: the ETag of our lock object
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._held = False

    def owner(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now(timezone.utc).isoformat(), "heartbeat_at": time.time()}

    def acquire(self) -> None:
        if storage.is_local(self.uri):
            self._acquire_local()
        elif self.uri.startswith(("s3://", "s3a://")):
            self._acquire_s3()
        else:
            self._acquire_checked()
        self._held = True

    def release(self) -> None:
        """Let go of a lock this object holds (a lock it never got is left alone)."""
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        elif self._etag is not None:
            fs, path = storage.filesystem_for(self.uri)
            bucket, key, _ = fs.split_path(path)
            with contextlib.suppress(OSError):  # taken over meanwhile: that run's lock stays
                fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self._etag)
            self._etag = None
        else:
            storage.remove(self.uri)

    # -- local ------------------------------------------------------------------------------------------

    def _acquire_local(self) -> None:
        import fcntl

        _, path = storage.filesystem_for(self.uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held open for the whole run)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _parse(handle.read())
            handle.close()
            raise OutputLocked(self._busy_message(holder)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(self.owner()))
        handle.flush()
        self._file = handle

    # -- S3 ---------------------------------------------------------------------------------------------

    def _acquire_s3(self) -> None:
        fs, path = storage.filesystem_for(self.uri)
        try:
            self._etag = fs.pipe_file(path, self._body(), mode="create")["ETag"]
        except FileExistsError:
            info, holder = self._read_s3(fs, path)
            if not _stale(holder, storage.modified_at(info)):
                raise OutputLocked(self._busy_message(holder)) from None
            try:  # compare-and-swap: only one of several runs taking over the stale lock succeeds
                self._etag = fs.pipe_file(path, self._body(), IfMatch=info["ETag"])["ETag"]
            except OSError:
                raise OutputLocked(self._busy_message(self._read_s3(fs, path)[1])) from None
        self._heartbeat = threading.Thread(target=self._beat, args=(fs, path), daemon=True,
                                           name=f"lock-heartbeat {self.output_uri}")
        self._heartbeat.start()

    def _beat(self, fs: Any, path: str) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._etag = fs.pipe_file(path, self._body(), IfMatch=self._etag)["ETag"]
            except OSError as exc:  # taken over (we looked dead) or storage trouble: say so, keep running
                storage.log.warning("lock %s: heartbeat failed: %s", self.uri, exc)

    def _read_s3(self, fs: Any, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        fs.invalidate_cache(path)
        info = fs.info(path)
        return info, _parse(fs.cat_file(path).decode("utf-8", "replace"))

    def _body(self) -> bytes:
        return json.dumps(self.owner()).encode()

    # -- other object stores ----------------------------------------------------------------------------

    def _acquire_checked(self) -> None:
        if storage.exists(self.uri):
            fs, path = storage.filesystem_for(self.uri)
            holder = _parse(storage.read_bytes(self.uri).decode("utf-8", "replace"))
            if not _stale(holder, storage.modified_at(fs.info(path))):
                raise OutputLocked(self._busy_message(holder))
        storage.write_bytes_atomic(self.uri, self._body())

    def _busy_message(self, holder: dict[str, Any]) -> str:
        who = (f"run {holder.get('run_id', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
               f"since {holder.get('since', '?')})") if holder else "another run"
        return (f"{self.output_uri} is being written by {who}; two runs never write one output at once: wait for "
                f"it to finish or stop it (lock: {self.uri})")


def _parse(text: str) -> dict[str, Any]:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict[str, Any], modified: float) -> bool:
    """A lock is stale when its holder is a dead process on this host, or it was not refreshed for a while."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
    return time.time() - max(modified, float(holder.get("heartbeat_at") or 0)) > STALE_AFTER_S


@contextlib.contextmanager
def locked_outputs(output_uris: Iterable[str], run_id: str) -> Iterator[None]:
    """Hold the lock of every output for the duration; refuses (OutputLocked) if any is held elsewhere."""
    held: list[OutputLock] = []
    try:
        for uri in sorted(set(output_uris)):  # one order for every run: two runs cannot deadlock
            lock = OutputLock(uri, run_id)
            lock.acquire()
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()
