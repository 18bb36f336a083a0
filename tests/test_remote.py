"""Remote submission through the Ray Jobs API, against the session's real Ray head (`jobs_head` in conftest.py:
`ray start --head` in a session of its own, shared with the metrics tests)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, free_port, wait_for

from lance_ray.cli import main
from lance_ray.cli.exit_codes import exit_code_for_error
from lance_ray.cli.remote import finished_run_outcome
from lance_ray.cluster.remote import (
    JOB_TAG,
    ClusterUnreachable,
    RemoteCluster,
    RunInfo,
    StagingError,
    UnknownSubmission,
    shipped_listing,
    stage_job,
)
from lance_ray.errors import LanceRayError
from lance_ray.pipeline.sinks import read_step_output
from lance_ray.pipeline.sources import open_source
from lance_ray.spec import load_job

SAMPLE_IMAGES = REPO_ROOT / "datasets" / "images"


# ------------------------------------------------------------------------------------- staging


def make_project(root: Path) -> Path:
    """A job whose inputs are a folder, an absolute glob, a table naming media by relative path,
    and an S3 URI, plus a file nothing references."""
    (root / "data" / "imgs").mkdir(parents=True)
    (root / "media").mkdir()
    (root / "extra").mkdir()
    (root / "jobs").mkdir()
    shutil.copy(SAMPLE_IMAGES / "sunset_320x240.jpg", root / "data" / "imgs" / "sunset.jpg")
    shutil.copy(SAMPLE_IMAGES / "tiles_256x256.png", root / "data" / "imgs" / "tiles.png")
    shutil.copy(SAMPLE_IMAGES / "banner_384x160.png", root / "extra" / "banner.png")
    shutil.copy(SAMPLE_IMAGES / "tower_240x320.jpg", root / "media" / "tower.jpg")
    (root / "data" / "unrelated.bin").write_bytes(b"\0" * 1000)
    (root / "data" / "q.jsonl").write_text('{"id": "q1", "img": "../media/tower.jpg", "question": "What?"}\n')
    job = root / "jobs" / "job.yaml"
    job.write_text(
        textwrap.dedent(f"""\
        name: staged
        models: {{image: {{source: lance-tiny, backend: debug}}}}
        output: ../out/{{run_date}}
        ray: {{address: "ray://elsewhere:10001"}}
        steps:
          - name: caption
            task: x2t_image
            input: {{path: [../data/imgs, "{root}/extra/*.png"], prompt: "Describe it."}}
          - name: ask
            task: x2t_image
            input:
              path: ../data/q.jsonl
              columns: {{row_id: id, image: img}}
              prompt: "{{{{ question }}}} (${{SECRET_WORD}})"
          - name: remote
            task: t2i
            input: {{path: "s3://bucket/prompts.jsonl"}}
        """)
    )
    return job


def test_stage_job_keeps_layout_row_ids_and_leaves_secrets_out(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_WORD", "hunter2")
    job_path = make_project(tmp_path / "project")
    staging = tmp_path / "staging"
    staging.mkdir()
    staged = stage_job(job_path, staging, allow_outside_inputs=True)  # q.jsonl names ../media/tower.jpg

    text = (staging / staged.job_file).read_text()
    assert "hunter2" not in text and "${SECRET_WORD}" in text  # expanded on the cluster, not here
    assert "ray" not in yaml.safe_load(text)
    assert any("${SECRET_WORD}" in note for note in staged.notes)
    assert any("`ray:` block" in note for note in staged.notes)
    assert sorted(staged.files) == ["data/imgs/sunset.jpg", "data/imgs/tiles.png", "data/q.jsonl",
                                    "extra/banner.png", "media/tower.jpg"]  # fmt: skip
    assert staged.size_bytes == sum((staging / f).stat().st_size for f in staged.files) + len(
        job_path.read_text()
    )

    original = load_job(job_path)
    monkeypatch.setenv("SECRET_WORD", "set-on-the-cluster")
    copy = load_job(staging / staged.job_file)
    assert copy.output == original.output  # local outputs become absolute: same place as before
    assert copy.step("remote").input.path == ["s3://bucket/prompts.jsonl"]
    for name in ("caption", "ask"):
        before = list(open_source(original.step(name), original).iter_rows())
        after = list(open_source(copy.step(name), copy).iter_rows())
        assert [r["row_id"] for r in after] == [r["row_id"] for r in before]
        assert all(r.get("error") is None for r in after)
        assert all(Path(r["image"]).is_relative_to(staging) and Path(r["image"]).is_file() for r in after)
        assert [Path(r["image"]).name for r in after] == [Path(r["image"]).name for r in before]
    assert [r["prompt"] for r in open_source(copy.step("ask"), copy).iter_rows()] == [
        "What? (set-on-the-cluster)"
    ]


def test_stage_job_ships_nothing_outside_the_input_folders_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_WORD", "x")
    job_path = make_project(tmp_path / "project")
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(StagingError) as refused:
        stage_job(job_path, staging)
    message = str(refused.value)
    assert str(tmp_path / "project" / "media" / "tower.jpg") in message and "row q1" in message
    assert "--allow-outside-inputs" in message and list(staging.iterdir()) == []


def test_a_row_naming_a_credentials_file_is_refused(tmp_path):
    secrets = tmp_path / "home" / ".aws"
    secrets.mkdir(parents=True)
    (secrets / "credentials").write_text("[default]\naws_secret_access_key = REAL-SECRET\n")
    project = tmp_path / "project"
    (project / "data" / "imgs").mkdir(parents=True)
    shutil.copy(SAMPLE_IMAGES / "tiles_256x256.png", project / "data" / "imgs" / "ok.png")
    os.symlink(secrets / "credentials", project / "data" / "imgs" / "innocent.png")  # a link out of the folder
    rows = [{"id": "a", "image": "imgs/ok.png"}, {"id": "b", "image": str(secrets / "credentials")},
            {"id": "c", "image": "../../home/.aws/credentials"}]
    (project / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = project / "job.yaml"
    job.write_text("name: leak\nmodels: {image: {source: lance-tiny, backend: debug}}\nsteps:\n"
                   "  - {name: ask, task: x2t_image, input: {path: data/rows.jsonl, columns: {row_id: id}}}\n"
                   "  - {name: look, task: x2t_image, input: {path: data/imgs, format: images}}\n")
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(StagingError) as refused:
        stage_job(job, staging)
    message = str(refused.value)
    assert "2 file(s)" in message and "row b" in message  # rows b and c name the same file
    assert str(project / "data" / "imgs" / "innocent.png") in message  # the symlink, found in the folder
    assert list(staging.iterdir()) == []

    (project / "data" / "imgs" / "innocent.png").unlink()
    (project / "data" / "rows.jsonl").write_text(json.dumps(rows[0]) + "\n")
    staged = stage_job(job, staging)
    assert sorted(staged.files) == ["data/imgs/ok.png", "data/rows.jsonl"]
    assert not any("REAL-SECRET" in p.read_text(errors="replace") for p in staging.rglob("*") if p.is_file())


def test_declared_files_travel_wherever_they_are(tmp_path):
    elsewhere = tmp_path / "shared" / "questions.jsonl"
    elsewhere.parent.mkdir()
    shutil.copy(SAMPLE_IMAGES / "tiles_256x256.png", elsewhere.parent / "tiles.png")
    elsewhere.write_text(json.dumps({"image": "tiles.png", "question": "What?"}) + "\n")
    job = tmp_path / "project" / "job.yaml"
    job.parent.mkdir()
    job.write_text("name: declared\nmodels: {image: {source: lance-tiny, backend: debug}}\nsteps:\n"
                   f"  - {{name: ask, task: x2t_image, input: {{path: {elsewhere}}}}}\n")
    staging = tmp_path / "staging"
    staging.mkdir()
    staged = stage_job(job, staging)
    assert sorted(staged.files) == ["shared/questions.jsonl", "shared/tiles.png"]
    listing = shipped_listing(staged, limit=1)
    assert listing == ["  project/job.yaml (the job file)", "  shared/questions.jsonl", "  ... and 1 more"]


def test_stage_job_refuses_inputs_over_the_limit(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "big.png").write_bytes(os.urandom(30_000))
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: big\nmodels: {image: {source: lance-tiny, backend: debug}}\n"
        "steps: [{name: c, task: x2t_image, input: {path: imgs}}]\n"
    )
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(StagingError) as err:
        stage_job(job, staging, max_bytes=20_000)
    assert "big.png" in str(err.value) and "S3" in str(err.value)
    assert list(staging.iterdir()) == []  # refused before anything was copied


def test_exit_code_follows_the_run():
    def exit_code(status: str, driver_exit_code: int | None) -> int:
        info = RunInfo("id", status, "j", "lance-ray run j.yaml", None, None, None, {}, {}, driver_exit_code)
        try:
            return finished_run_outcome(info)
        except LanceRayError as error:  # a failed run is raised, and exits through the one table
            return exit_code_for_error(error)

    assert exit_code("SUCCEEDED", 0) == 0
    assert exit_code("FAILED", 1) == 1  # `lance-ray run`: some rows failed
    assert exit_code("FAILED", 2) == 2  # bad job file on the cluster
    assert exit_code("FAILED", 3) == 3  # the run itself failed
    assert exit_code("FAILED", 4) == 4  # the job could not use the cluster's Ray
    assert exit_code("FAILED", None) == 3  # the driver never ran (e.g. runtime env setup failed)
    assert exit_code("STOPPED", None) == 3


def test_unreachable_address_exits_4(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SECRET_WORD", "x")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # it would override --address in Ray's SDK
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    job = make_project(tmp_path)
    nothing_listens = f"http://127.0.0.1:{free_port()}"
    assert main(["submit", str(job), "--address", nothing_listens]) == 4
    (line,) = capsys.readouterr().err.splitlines()[-1:]
    assert line.startswith(f"lance-ray submit: cannot reach the Ray Jobs API at {nothing_listens}")
    for command in (["status"], ["status", "raysubmit_x"], ["logs", "raysubmit_x"], ["stop", "raysubmit_x"],
                    ["list"]):
        assert main([*command, "--address", nothing_listens]) == 4, command
        err = capsys.readouterr().err
        assert f"cannot reach the Ray Jobs API at {nothing_listens}" in err and "Traceback" not in err
    with pytest.raises(ClusterUnreachable):
        RemoteCluster(nothing_listens)


def test_env_from_local_must_be_set(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LANCE_RAY_NOT_SET", raising=False)
    rc = main(["submit", str(write_caption_job(tmp_path)), "--env-from-local", "LANCE_RAY_NOT_SET"])
    assert rc == 2 and "LANCE_RAY_NOT_SET" in capsys.readouterr().err


# ------------------------------------------------------------------------------ against the head


def write_caption_job(root: Path, *, schedule: str | None = None) -> Path:
    (root / "imgs").mkdir(parents=True)
    for name in ("sunset_320x240.jpg", "tiles_256x256.png"):
        shutil.copy(SAMPLE_IMAGES / name, root / "imgs" / name)
    job = root / "caption.yaml"
    job.write_text(
        textwrap.dedent(f"""\
        name: remote-caption
        models: {{image: {{source: lance-tiny, backend: debug}}}}
        output: {root / "out" / "{run_date}"}
        {"schedule: " + schedule if schedule else ""}
        steps:
          - name: caption
            task: x2t_image
            input: {{path: imgs, prompt: "Describe it."}}
            params: {{preset: image_256res}}
        """)
    )
    return job


@pytest.mark.slow
def test_submit_follow_status_logs_list(jobs_head, tmp_path, capsys, monkeypatch):
    secret = "s3cr3t-value-never-printed"
    monkeypatch.setenv("LANCE_RAY_TEST_TOKEN", secret)
    not_forwarded = {"AWS_SECRET_ACCESS_KEY": "fake-aws-secret-0042", "HF_TOKEN": "hf_fake_token_0042"}
    for name, value in not_forwarded.items():
        monkeypatch.setenv(name, value)
    job = write_caption_job(tmp_path)
    rc = main(["submit", str(job), "--address", jobs_head, "--follow", "--run-date", "2026-02-03",
               "--env-from-local", "LANCE_RAY_TEST_TOKEN"])  # fmt: skip
    submitted = capsys.readouterr()
    assert rc == 0, submitted.err[-3000:]
    submission_id = submitted.out.splitlines()[0]
    assert "LANCE_RAY_SUMMARY" in submitted.out  # the followed logs

    table = read_step_output(str(tmp_path / "out" / "2026-02-03" / "caption"))
    expected_ids = [
        r["row_id"] for r in open_source(load_job(job).step("caption"), load_job(job)).iter_rows()
    ]
    assert sorted(table.column("row_id").to_pylist()) == sorted(expected_ids)
    assert table.column("error").null_count == table.num_rows == 2

    cluster = RemoteCluster(jobs_head)
    info = cluster.info(submission_id)
    assert (info.status, info.job_name, info.rows_ok, info.rows_failed) == (
        "SUCCEEDED",
        "remote-caption",
        2,
        0,
    )
    assert info.runtime_env["env_vars"] == {"LANCE_RAY_TEST_TOKEN": secret}  # forwarded to the job …

    assert main(["status", submission_id, "--address", jobs_head]) == 0
    status = capsys.readouterr().out
    assert "SUCCEEDED" in status and "2 ok, 0 failed" in status and "LANCE_RAY_TEST_TOKEN=***" in status
    assert main(["list", "--address", jobs_head]) == 0
    listing = capsys.readouterr().out
    (row,) = [line for line in listing.splitlines() if line.startswith(submission_id)]
    assert row.split()[1:3] == ["remote-caption", "SUCCEEDED"] and row.split()[-2:] == ["2", "0"]
    assert main(["logs", submission_id, "--address", jobs_head]) == 0
    logs = capsys.readouterr().out
    assert "LANCE_RAY_SUMMARY" in logs
    for text in (submitted.out, submitted.err, status, listing, logs):  # … and never printed
        assert secret not in text
    recorded = repr((info.entrypoint, info.runtime_env, info.metadata))  # what the cluster keeps
    for text in (submitted.out, submitted.err, status, listing, logs, recorded):
        assert not any(value in text for value in not_forwarded.values())


def test_status_logs_stop_on_a_long_running_job(jobs_head, capsys):
    cluster = RemoteCluster(jobs_head)
    submission_id = cluster.client.submit_job(
        entrypoint=f"{sys.executable} -c \"import time; print('sleeping', flush=True); time.sleep(600)\"",
        metadata={JOB_TAG: "sleeper"},
    )
    wait_for(lambda: "sleeping" in cluster.logs(submission_id), what="the job to start")
    assert main(["status", submission_id, "--address", jobs_head]) == 0
    assert "status:     RUNNING" in capsys.readouterr().out
    assert main(["logs", submission_id, "--address", jobs_head]) == 0
    assert "sleeping" in capsys.readouterr().out

    assert main(["stop", submission_id, "--address", jobs_head]) == 0
    assert "stop requested" in capsys.readouterr().out
    wait_for(lambda: cluster.info(submission_id).status == "STOPPED", what="STOPPED")
    assert main(["logs", submission_id, "--address", jobs_head, "--follow"]) == 3  # ended, not succeeded
    assert main(["stop", submission_id, "--address", jobs_head]) == 0
    assert "already finished" in capsys.readouterr().out


def test_unknown_submission_id_exits_4(jobs_head, capsys):
    cluster = RemoteCluster(jobs_head)
    unknown = "raysubmit_doesnotexist"
    assert cluster.info(unknown) is None  # the scheduler relies on this to decide whether to submit
    for call in (cluster.logs, cluster.stop, lambda sid: cluster.follow(sid, sys.stdout)):
        with pytest.raises(UnknownSubmission):
            call(unknown)
    for command in (["status", unknown], ["logs", unknown], ["logs", unknown, "--follow"], ["stop", unknown]):
        assert main([*command, "--address", jobs_head]) == 4, command
        assert capsys.readouterr().err.splitlines() == [
            f"lance-ray {command[0]}: the Ray cluster at {jobs_head} has no submission {unknown}"
        ]


def test_scheduler_submits_a_real_run(jobs_head, tmp_path):
    from fake_clock import FakeClock

    from lance_ray.cluster.schedule import RunHistory, Scheduler, load_scheduled_jobs, submission_id_for

    job = write_caption_job(tmp_path, schedule='{cron: "0 2 * * *", timezone: "America/Los_Angeles"}')
    scheduled_for = datetime(2026, 1, 1, 10, tzinfo=timezone.utc)  # 02:00 in Los Angeles (UTC-8)
    clock = FakeClock(scheduled_for + timedelta(seconds=20))
    cluster = RemoteCluster(jobs_head)
    scheduler = Scheduler(
        load_scheduled_jobs([str(job)]), RunHistory(tmp_path / "h.sqlite"), cluster, clock=clock
    )
    scheduler.tick()
    submission_id = submission_id_for("remote-caption", scheduled_for)
    wait_for(lambda: cluster.info(submission_id).status in ("SUCCEEDED", "FAILED"), what="the scheduled run")
    clock.sleep(60)
    scheduler.tick()
    (run,) = scheduler.history.runs("remote-caption")
    assert (run.status, run.submission_id, run.rows_ok, run.rows_failed) == ("SUCCEEDED", submission_id, 2, 0)
    assert read_step_output(str(tmp_path / "out" / "2026-01-01" / "caption")).num_rows == 2
    assert cluster.info(submission_id).metadata["lance_ray_scheduled_for"] == "2026-01-01T10:00:00+00:00"


def test_schedule_once_with_nothing_due(jobs_head, tmp_path, capsys):
    job = write_caption_job(tmp_path, schedule='{cron: "0 0 1 1 *"}')
    history = tmp_path / "h.sqlite"
    assert main(["schedule", str(job), "--once", "--address", jobs_head, "--history", str(history)]) == 0
    out = capsys.readouterr().out
    assert "remote-caption: cron '0 0 1 1 *' in UTC" in out and "next run" in out
    assert main(["schedule", str(job), "--show", "--history", str(history)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # header and rule only: nothing ran


@pytest.mark.slow
def test_quickstart_end_to_end(jobs_head, tmp_path, capsys):
    """`lance-ray submit jobs/quickstart.yaml --follow`: the real tiny model on the cluster."""
    job_path = REPO_ROOT / "jobs" / "quickstart.yaml"
    out = tmp_path / "quickstart"
    rc = main(["submit", str(job_path), "--address", jobs_head, "--follow", "--output", str(out)])
    assert rc == 0, capsys.readouterr().out[-5000:]
    job = load_job(job_path)
    for step in job.steps:
        table = read_step_output(str(out / step.name))
        assert table.num_rows == open_source(step, job).count()
        assert table.column("error").null_count == table.num_rows, step.name


# ------------------------------------------------------------------------------ deployment files


def test_cluster_yaml_matches_the_ray_autoscaler_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert "InstanceType" in types[config["head_node_type"]]["node_config"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    # GPU instance types with >= 48 GB per GPU: g6e (L40S 48 GB), p4de (A100 80 GB), p5 (H100 80 GB), p5e (H200).
    big_gpu_families = ("g6e.", "p4de.", "p5.", "p5e.")
    assert workers and all(
        t["node_config"]["InstanceType"].startswith(big_gpu_families) for t in workers.values()
    )
    assert any(t["min_workers"] == 0 < t["max_workers"] for t in workers.values())  # scales from zero
    assert all(t["max_workers"] <= config["max_workers"] for t in workers.values())
    commands = " ".join(config["setup_commands"])
    assert "lance-ray-jobs" in commands and f"ray[default,data]=={ray.__version__}" in commands
    for start in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray start" not in start or ("LANCE_RAY_CACHE=" in start and "HF_HOME=" in start)  # on local NVMe


def test_kuberay_rayjob_manifest():
    import ray

    from lance_ray.spec import load_job_text

    docs = list(yaml.safe_load_all((REPO_ROOT / "deploy" / "kuberay-rayjob.yaml").read_text()))
    by_kind = {doc["kind"]: doc for doc in docs}
    assert set(by_kind) == {"ConfigMap", "RayJob"}
    rayjob, config_map = by_kind["RayJob"], by_kind["ConfigMap"]
    assert rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    command = spec["entrypoint"].split()
    assert command[:2] == ["lance-ray", "run"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__

    # The job file the entrypoint names is in the ConfigMap mounted on the head, and it is a valid job.
    head = cluster["headGroupSpec"]["template"]["spec"]
    (container,) = head["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    (mount_name,) = [name for name, path in mounts.items() if command[2].startswith(path + "/")]
    assert volumes[mount_name]["configMap"]["name"] == config_map["metadata"]["name"]
    job_text = config_map["data"][command[2].rsplit("/", 1)[1]]
    job = load_job_text(job_text, "configmap")
    assert all(step.input.path and step.input.path[0].startswith("s3://") for step in job.steps)
    assert job.output.startswith("s3://")

    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert (
        worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"]
    )
    assert worker["image"] == container["image"]
    assert {"name": "LANCE_RAY_CACHE", "value": "/cache"} in worker["env"]
    assert {"name": "HF_HOME", "value": "/cache/huggingface"} in worker["env"]  # hub checkpoints there too
    assert "AWS_SECRET_ACCESS_KEY" not in (REPO_ROOT / "deploy" / "kuberay-rayjob.yaml").read_text()
