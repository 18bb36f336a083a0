"""Shared test fixtures: one local Ray per session, the tiny checkpoint, a local S3 server."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

# Keep Ray quiet and local; never let a test reach a real cloud endpoint.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
