"""Keeps Ray's own log lines off a user's terminal (`lance-ray -v` shows them).

Ray writes to the driver's stderr from Python (its loggers: the token-authentication notice,
"Started a local Ray instance", Ray Data's "Progress bars disabled ...") and from C++ (the core
worker's glog lines, e.g. the note on actor constructor arguments in the object store). The Python
side can be turned down with log levels (`init_ray` does), the C++ side cannot without also silencing
the log files of the raylet and GCS, which are what one reads after a crash. So for the length of a
command, file descriptor 2 goes through a pipe, and a thread forwards every line to the real stderr
except those in Ray's log formats. Our own output, tracebacks and every other program's lines pass.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Line starts in Ray's formats: C++ glog `[2026-11-30 13:24:36,883 E 25350 25350] core_worker.cc:..`,
# Ray's Python logger `2026-11-30 13:24:22,728\tWARNING worker.py:2038 -- ...`, and lines that Ray
# forwards from workers: `(MapWorker(MapBatches(LanceWorker)) pid=123) ...`, `(raylet) ...`.
_TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+"
RAY_LINE = re.compile(
    rf"\[{_TIMESTAMP} [DIWEF] \d+ \d+\] "
    rf"|{_TIMESTAMP}\t(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+:\d+ -- "
    r"|\((?:[^()\n]|\([^()\n]*(?:\([^()\n]*\))?[^()\n]*\))*pid=\d+(?:, ip=[\d.]+)?\) "
    r"|\((?:raylet|gcs_server|autoscaler|dashboard_agent)(?:, ip=[\d.]+)?\) "
)
_INSIDE_A_LINE = re.compile(rf"\[{_TIMESTAMP} [DIWEF] \d+ \d+\] ".encode())
# Every one of those formats starts with `[`, `(` or a digit; a line that starts otherwise passes at once,
# one that does is held until it ends (or grows past _DECIDE_AFTER characters).
_MAYBE_RAY = re.compile(r"[\[(0-9]")
_DECIDE_AFTER = 400
_END = b"\0lance-ray: end of filtered stderr\0"


def is_ray_line(line: str) -> bool:
    return RAY_LINE.match(line) is not None


class _LineFilter:
    """Splits a byte stream into lines (at \\n and \\r, which terminal redraws use) and drops Ray's.

    A line's start is held back only until it is clear that it is not Ray's, so a progress bar that
    redraws without a newline still shows at once."""

    def __init__(self, write) -> None:
        self.write = write
        self.pending = b""  # the start of a line not yet decided
        self.passing = False  # the current line was decided to pass: forward the rest as it comes
        self.dropping = False  # the current line is Ray's: drop the rest of it

    def feed(self, data: bytes) -> None:
        while data:
            cut = min((i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0), default=-1)
            piece, data = (data, b"") if cut < 0 else (data[: cut + 1], data[cut + 1 :])
            self._piece(piece, ends_line=cut >= 0)

    def _piece(self, piece: bytes, ends_line: bool) -> None:
        if self.passing:
            self._pass(piece)
        elif not self.dropping:
            self.pending += piece
            text = self.pending.decode("utf-8", "replace")
            if ends_line or len(text) >= _DECIDE_AFTER or not _MAYBE_RAY.match(text):
                if is_ray_line(text):
                    self.dropping = True
                else:
                    self.passing = True
                    self._pass(self.pending)
                self.pending = b""
        if ends_line:
            self.passing = self.dropping = False

    def _pass(self, data: bytes) -> None:
        """Forwards a passing line's bytes, up to a C++ line that Ray wrote into the middle of it (as it
        does into a progress bar being redrawn)."""
        inside = _INSIDE_A_LINE.search(data)
        self.write(data if inside is None else data[: inside.start()])
        if inside is not None:
            self.passing, self.dropping = False, True

    def flush(self) -> None:
        if self.pending and not is_ray_line(self.pending.decode("utf-8", "replace")):
            self.write(self.pending)
        self.pending = b""


def _forward(read_fd: int, out_fd: int) -> None:
    def write(data: bytes) -> None:
        os.write(out_fd, data)

    line_filter = _LineFilter(write)
    tail = b""
    while True:
        data = os.read(read_fd, 65536)
        if not data:
            break
        data = tail + data
        end = data.find(_END)
        if end >= 0:
            line_filter.feed(data[:end])
            break
        # keep a possible partial end marker back for the next read
        keep = next((n for n in range(min(len(_END) - 1, len(data)), 0, -1) if _END.startswith(data[-n:])), 0)
        data, tail = (data[:-keep], data[-keep:]) if keep else (data, b"")
        line_filter.feed(data)
    line_filter.flush()
    os.close(read_fd)


class _TerminalStderr(io.TextIOWrapper):
    """`sys.stderr` while fd 2 is the filter's pipe, when the real stderr is a terminal: it still says so,
    so that progress bars redraw in place instead of printing a line per update."""

    def __init__(self, encoding: str) -> None:
        super().__init__(io.FileIO(2, "w", closefd=False), encoding=encoding, errors="backslashreplace",
                         line_buffering=True)

    def isatty(self) -> bool:
        return True


@contextmanager
def ray_lines_hidden(enabled: bool = True) -> Iterator[None]:
    """Within the block, lines in Ray's log formats written to stderr (fd 2) by this process, Python or
    C++, are dropped; everything else reaches stderr unchanged and in order."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved_stream = sys.stderr
    on_terminal = saved_stream.isatty()  # asked before fd 2 becomes the pipe
    real_stderr = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    forwarder = threading.Thread(target=_forward, args=(read_fd, real_stderr), name="stderr-filter", daemon=True)
    forwarder.start()
    if on_terminal:
        sys.stderr = _TerminalStderr(saved_stream.encoding)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = saved_stream
        # Processes started meanwhile may still hold the pipe open, so the forwarder stops at a marker
        # rather than at end of file.
        os.write(2, _END)
        os.dup2(real_stderr, 2)
        forwarder.join(timeout=10)
        os.close(real_stderr)
