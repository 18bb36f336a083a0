"""Credentials in the environment never reach logs, plans, outputs or submissions.

Distinctive fake values are set for the AWS keys and the Hugging Face token; then a job is validated,
planned and run (a `lance-ray run` process of its own, with its own local Ray whose logs we keep,
writing to moto's S3 and to a local folder) and staged for submission. Every byte these produce is
searched for the values.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import fsspec
import pytest
from conftest import REPO_ROOT

from lance_ray.cluster.remote import RemoteCluster, SubmitOptions

FAKE = {
    "AWS_ACCESS_KEY_ID": "AKIALANCERAYFAKE0042",
    "AWS_SECRET_ACCESS_KEY": "lanceRayFakeSecret/0042+never-print-me",
    "AWS_SESSION_TOKEN": "lanceRayFakeSessionToken0042",
    "HF_TOKEN": "hf_lanceRayFakeHubToken0042",
    "HUGGING_FACE_HUB_TOKEN": "hf_lanceRayFakeHubTokenOld0042",
}


def _leaks(data: bytes) -> list[str]:
    return [name for name, value in FAKE.items() if value.encode() in data]


def _leaks_in_tree(root: Path) -> dict[str, list[str]]:
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            leaked = _leaks(path.read_bytes())
            if leaked:
                found[str(path)] = leaked
    return found


def _job(folder: Path, bucket: str) -> Path:
    job = folder / "creds.yaml"
    job.write_text(f"""\
name: creds
models: {{image: {{source: lance-tiny, backend: debug}}}}
output: {folder / 'out'}
steps:
  - name: draw
    task: t2i
    input: {{rows: [{{prompt: "a key"}}, {{prompt: "a lock"}}]}}
    params: {{height: 32, width: 32, steps: 2}}
    output: s3://{bucket}/draw
  - name: look
    task: x2t_image
    input: {{from_step: draw, prompt: "Describe {{{{ prompt }}}}."}}
""")
    return job


@pytest.mark.slow
def test_fake_credentials_appear_nowhere(tmp_path: Path, s3_server: str) -> None:
    bucket = "creds-out"
    fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server}).mkdir(bucket)
    job = _job(tmp_path, bucket)
    ray_tmp = Path(tempfile.mkdtemp(prefix="lrc", dir="/tmp"))  # short: Ray's socket paths must fit
    env = {**os.environ, **FAKE, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    produced: dict[str, bytes] = {}
    # -v: lance-ray's debug log too (botocore's would print the access key id with every request).
    for command in (["validate", str(job)], ["plan", str(job)], ["-v", "run", str(job), "--no-progress"]):
        proc = subprocess.run([sys.executable, "-m", "lance_ray.cli", *command], cwd=tmp_path, env=env,
                              capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        produced[" ".join(command)] = proc.stdout + proc.stderr
    assert any(b"LANCE_RAY_SUMMARY" in output for output in produced.values())

    objects = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server}).find(f"{bucket}/draw")
    assert any(name.endswith(".parquet") for name in objects) and any(name.endswith(".png") for name in objects)
    s3 = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_server})
    leaks = {f"s3://{name}": _leaks(s3.cat(name)) for name in objects}
    leaks |= {command: _leaks(output) for command, output in produced.items()}
    leaks |= _leaks_in_tree(tmp_path)  # the local step's parquet, media and manifests, the _runs events
    logs = list(ray_tmp.rglob("*.log")) + list(ray_tmp.rglob("*.out")) + list(ray_tmp.rglob("*.err"))
    assert logs  # the run's Ray session kept its logs here
    leaks |= _leaks_in_tree(ray_tmp)
    assert {where: names for where, names in leaks.items() if names} == {}


class _RecordingJobsClient:
    """Stands in for Ray's JobSubmissionClient: records what a submission would send, and the files."""

    def __init__(self) -> None:
        self.sent: dict = {}
        self.files: dict[str, bytes] = {}

    def submit_job(self, **request) -> str:
        self.sent = request
        root = Path(request["runtime_env"]["working_dir"])  # still there: submit() has not returned
        self.files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        return "raysubmit_recorded"


def test_a_submission_carries_no_credentials(tmp_path: Path, monkeypatch, capsys) -> None:
    for name, value in FAKE.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes((REPO_ROOT / "datasets" / "images" / "tiles_256x256.png").read_bytes())
    job = tmp_path / "job.yaml"
    job.write_text("name: creds\nmodels: {image: {source: lance-tiny, backend: debug}}\n"
                   "output: s3://bucket/${AWS_ACCESS_KEY_ID:-none}/out\nsteps:\n"
                   "  - {name: look, task: x2t_image, input: {path: imgs, prompt: 'Describe it.'}}\n")
    cluster = RemoteCluster.__new__(RemoteCluster)  # no dashboard: the recorder takes the request
    cluster.client, cluster.address = _RecordingJobsClient(), "recorded"
    cluster._connection_errors, cluster._auth_error = (ConnectionError,), PermissionError
    submission = cluster.submit(job, SubmitOptions(pip="lance-ray-jobs"), out=sys.stderr)
    printed = capsys.readouterr()
    assert submission == "raysubmit_recorded"
    assert "imgs/a.png" in printed.err and "job.yaml (the job file)" in printed.err  # the list of what ships
    request = cluster.client.sent
    assert sorted(cluster.client.files) == ["imgs/a.png", "job.yaml"]
    assert b"${AWS_ACCESS_KEY_ID:-none}" in cluster.client.files["job.yaml"]  # expanded on the cluster
    assert "env_vars" not in request["runtime_env"]  # nothing forwarded unless asked
    sent = repr(request).encode() + b"".join(cluster.client.files.values()) + (printed.out + printed.err).encode()
    assert _leaks(sent) == []
