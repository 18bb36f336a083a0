"""The actor watchdog: a model call that hangs turns into row errors within a set time, never a hung job.

A GPU actor wraps every model call in `watching(row_ids, timeout_s)`. A thread checks the open calls
once a second; when one has run past its timeout (a hung kernel, a deadlocked decode), it records the
call's row ids as *suspects* under the run's events folder and ends the actor's process. Ray then starts
a new actor and retries the batch; the new actor finds the suspects recorded and writes those rows as
errors ("timed out ...") without running them again, so a row that hangs the model costs one restart,
not an endless loop of them. The other rows of the batch run as usual on the new actor (the timed-out
call's rows are all suspects: they were on the device together, and which one hung cannot be told).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lance_ray.io import storage

log = logging.getLogger(__name__)

EXIT_TIMED_OUT = 70  # the actor's exit status when the watchdog ends it (EX_SOFTWARE)
SUSPECTS_DIR = "suspects"


@dataclass
class _Watch:
    row_ids: list[str]
    timeout_s: float
    deadline: float
    what: str


class Watchdog:
    def __init__(self, events_uri: str | None, *, poll_s: float = 1.0) -> None:
        self.suspects_uri = storage.join_uri(events_uri, SUSPECTS_DIR) if events_uri else None
        self._watches: dict[int, _Watch] = {}
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._known: dict[str, str] = {}
        self._read_at = 0.0
        threading.Thread(target=self._loop, args=(poll_s,), name="lance-watchdog", daemon=True).start()

    @contextmanager
    def watching(self, row_ids: list[str], timeout_s: float | None, what: str) -> Iterator[None]:
        """Run the body under a deadline of `timeout_s` seconds (None: no deadline)."""
        if timeout_s is None:
            yield
            return
        with self._lock:
            key = next(self._keys)
            self._watches[key] = _Watch(row_ids, timeout_s, time.monotonic() + timeout_s, what)
        try:
            yield
        finally:
            with self._lock:
                self._watches.pop(key, None)

    def suspects(self) -> dict[str, str]:
        """row id -> error text, for rows that hung an actor earlier in this run (read at most every 5 s)."""
        if self.suspects_uri is None or time.monotonic() - self._read_at < 5:
            return self._known
        self._read_at = time.monotonic()
        fs, root = storage.filesystem_for(self.suspects_uri)
        fs.invalidate_cache(root)
        if fs.exists(root):
            for path in fs.ls(root, detail=False):
                with fs.open(path, "rb") as f:
                    record = json.load(f)
                message = (f"timed out: {record['what']} ran past {record['timeout_s']:.0f}s "
                           "(its worker was restarted; the row was not run again)")
                self._known.update(dict.fromkeys(record["row_ids"], message))
        return self._known

    def _loop(self, poll_s: float) -> None:
        while True:
            time.sleep(poll_s)
            now = time.monotonic()
            with self._lock:
                overdue = next((w for w in self._watches.values() if now > w.deadline), None)
            if overdue is not None:
                self._give_up(overdue)

    def _give_up(self, watch: _Watch) -> None:
        log.error("%s ran past %.0fs: recording %d row(s) as timed out and restarting this worker",
                  watch.what, watch.timeout_s, len(watch.row_ids))
        if self.suspects_uri is not None:
            record = {"row_ids": watch.row_ids, "timeout_s": watch.timeout_s, "what": watch.what, "pid": os.getpid()}
            storage.write_bytes_atomic(storage.join_uri(self.suspects_uri, f"{uuid.uuid4().hex}.json"),
                                       json.dumps(record).encode())
        os._exit(EXIT_TIMED_OUT)  # a hung CUDA call cannot be interrupted; Ray restarts the actor
