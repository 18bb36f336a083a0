"""Object-store faults while a sink writes: moto's S3 server stopped and restarted mid-write, and a proxy
on localhost that answers some requests with 503 or drops the connection without an answer (what a
client sees when a load balancer times out).

botocore's own retries are turned off here (`AWS_MAX_ATTEMPTS=1`), so what keeps the writes going is
lance-ray's bounded, backed-off retry in `lance_ray/io/storage.py`. Afterwards every part is whole,
none was ever half visible, and nothing is lost.
"""

from __future__ import annotations

import http.client
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
from conftest import free_port
from moto.server import ThreadedMotoServer

from lance_ray.io import storage
from lance_ray.pipeline.sinks import EncodedMedia, OutputRow, ParquetSink, part_name


def _row(i: int) -> OutputRow:
    return OutputRow({"row_id": f"r{i:02d}", "step": "gen", "task": "t2i", "prompt": f"p{i}"},
                     EncodedMedia(f"png bytes of r{i:02d}".encode(), "png"))


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Point s3:// at an endpoint, with botocore's retries off."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    return lambda endpoint: monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)


@pytest.fixture
def moto_server() -> Iterator[tuple[int, list[ThreadedMotoServer]]]:
    """A moto server of this test's own (the session's is shared); the list holds the running instance."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    running = [server]
    yield port, running
    running[-1].stop()


def _check_everything_committed(out: str, rows: int) -> None:
    """Every row committed exactly once, every part whole, every media file complete, no temp objects."""
    fs, root = storage.filesystem_for(out)
    fs.invalidate_cache()
    parts = sorted(p for p in fs.ls(root) if p.endswith(".parquet"))
    assert [p.rsplit("/", 1)[-1] for p in parts] == sorted(part_name([f"r{i:02d}"]) for i in range(rows))
    for path in parts:
        (row,) = pq.read_table(path, filesystem=fs).to_pylist()  # parses: whole
        assert fs.cat(f"{root}/__media__/{row['row_id']}.png") == f"png bytes of {row['row_id']}".encode()
    assert not [p for p in fs.find(root) if storage.TEMP_MARKER in p]


def test_s3_server_stopped_and_restarted_mid_write(moto_server, s3_env, caplog) -> None:
    port, running = moto_server
    s3_env(f"http://127.0.0.1:{port}")
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    storage.filesystem_for(f"s3://{bucket}")[0].mkdir(bucket)
    out = f"s3://{bucket}/gen"
    sink = ParquetSink(out, "gen")
    failures: list[BaseException] = []
    written = threading.Event()

    def writer() -> None:
        try:
            for i in range(16):
                sink.write_part([_row(i)])
                if i == 4:
                    written.set()
                time.sleep(0.05)
        except BaseException as exc:  # handed to the test below
            failures.append(exc)
            written.set()

    thread = threading.Thread(target=writer)
    with caplog.at_level(logging.WARNING, logger="lance_ray.io.storage"):
        thread.start()
        assert written.wait(60)
        running[-1].stop()  # the store goes away mid-write ...
        time.sleep(2.0)
        running.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        running[-1].start()  # ... and comes back (moto keeps its objects in this process)
        thread.join(120)
    assert not thread.is_alive() and not failures, failures
    assert any("retry" in r.message for r in caplog.records), "the outage must have been retried"
    _check_everything_committed(out, 16)


class FaultProxy(ThreadingHTTPServer):
    """Forwards HTTP to `upstream`; `faults` says, per request, "ok", "500", "503" or "drop"."""

    daemon_threads = True

    def __init__(self, upstream_port: int, faults: Iterator[str]):
        self.upstream_port = upstream_port
        self.faults = faults
        self.counts: dict[str, int] = {"ok": 0, "500": 0, "503": 0, "drop": 0}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(BaseHTTPRequestHandler):
    server: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` answered as clients expect

    def log_message(self, *args) -> None:  # quiet
        pass

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            fault = next(self.server.faults)
            self.server.counts[fault] += 1
        if fault == "drop":  # no answer at all: the connection just closes
            self.close_connection = True
            return
        if fault in ("500", "503"):
            code = "InternalError" if fault == "500" else "SlowDown"
            payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            self.send_response(int(fault))
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


def test_injected_5xx_and_dropped_connections_are_retried(moto_server, s3_env, caplog) -> None:
    port, _ = moto_server
    s3_env(f"http://127.0.0.1:{port}")
    bucket = f"proxied-{uuid.uuid4().hex[:8]}"
    storage.filesystem_for(f"s3://{bucket}")[0].mkdir(bucket)
    # In every 8 requests: two 500s in a row (s3fs does not retry those), a 503 SlowDown and a dropped
    # connection (s3fs retries those itself).
    pattern = itertools.cycle(["ok", "500", "500", "ok", "drop", "ok", "503", "ok"])
    proxy = FaultProxy(port, pattern)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        s3_env(f"http://127.0.0.1:{proxy.server_address[1]}")
        out = f"s3://{bucket}/gen"
        sink = ParquetSink(out, "gen")
        with caplog.at_level(logging.WARNING, logger="lance_ray.io.storage"):
            sink.prepare()
            for i in range(12):
                sink.write_part([_row(i)])
            manifest = sink.commit({"step": "gen"})
            assert sink.committed_ids() == {f"r{i:02d}" for i in range(12)}
        assert manifest["rows_ok"] == 12
        assert proxy.counts["500"] >= 10 and proxy.counts["503"] >= 5 and proxy.counts["drop"] >= 5
        assert sum("retry" in r.message for r in caplog.records) >= 5
    finally:
        proxy.shutdown()
    s3_env(f"http://127.0.0.1:{port}")
    _check_everything_committed(f"s3://{bucket}/gen", 12)


def test_permanent_errors_are_not_retried(tmp_path, monkeypatch) -> None:
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("AccessDenied")

    with pytest.raises(PermissionError):
        storage.retrying(denied, "a denied write")
    assert len(calls) == 1
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    monkeypatch.setattr(storage, "RETRY_BASE_DELAY_S", 0.001)
    assert storage.retrying(flaky, "a flaky read") == "ok" and len(attempts) == 3

    def always_down():
        raise TimeoutError("no answer")

    with pytest.raises(TimeoutError):
        storage.retrying(always_down, "a dead store")
