"""`lance-ray schedule JOB --emit raycronjob|cronjob`: manifests validated against the Kubernetes and KubeRay
schemas (tests/fixtures/k8s, no cluster), their commands understood by our own CLI, and `--scheduled` giving
the run the built-in scheduler would."""

from __future__ import annotations

import copy
import gzip
import json
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import REPO_ROOT

from lance_ray.cli import build_parser, main
from lance_ray.cli.jobs import scheduled_run
from lance_ray.cluster.schedule import due_times, latest_due
from lance_ray.spec import ScheduleSpec, load_job

SCHEMAS = REPO_ROOT / "tests" / "fixtures" / "k8s"


def _schema(name: str) -> dict:
    return json.loads(gzip.decompress((SCHEMAS / name).read_bytes()))


def _no_unknown_fields(schema: dict) -> dict:
    """A CRD's OpenAPI schema as `kubectl apply --validate=strict` applies it: fields it does not declare
    are errors (except where the CRD keeps unknown fields)."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


VALIDATORS = {
    ("v1", "ConfigMap"): jsonschema.Draft7Validator(_schema("configmap-v1.v1.32.2-strict.json.gz")),
    ("batch/v1", "CronJob"): jsonschema.Draft7Validator(_schema("cronjob-batch-v1.v1.32.2-strict.json.gz")),
}
_crd = _schema("ray.io_raycronjobs.v1.kuberay-1.7.0.json.gz")
VALIDATORS[(f"{_crd['group']}/{_crd['version']}", _crd["kind"])] = jsonschema.Draft7Validator(
    _no_unknown_fields(_crd["openAPIV3Schema"]))


def validate(doc: dict) -> None:
    VALIDATORS[(doc["apiVersion"], doc["kind"])].validate(doc)


def _job(tmp_path: Path, schedule: str = '{cron: "0 2 * * *", timezone: Europe/Berlin}') -> Path:
    job = tmp_path / "nightly.yaml"
    job.write_text(textwrap.dedent(f"""\
        name: nightly_captions
        models: {{image: {{source: lance-tiny, backend: debug}}}}
        output: s3://bucket/captions/{{run_date}}
        schedule: {schedule}
        steps:
          - name: caption
            task: x2t_image
            input: {{path: "s3://bucket/uploads/*.jpg", prompt: "Describe it."}}
        """))
    return job


def _emit(capsys: pytest.CaptureFixture, *argv: str) -> tuple[list[dict], str]:
    assert main(["schedule", *argv]) == 0
    captured = capsys.readouterr()
    return list(yaml.safe_load_all(captured.out)), captured.err


def test_raycronjob_manifest_is_valid_and_runs_the_job_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import ray

    job = _job(tmp_path)
    docs, notes = _emit(capsys, str(job), "--emit", "raycronjob", "--image", "registry.example/lance-ray:1")
    for doc in docs:
        validate(doc)
    config_map, cron = docs
    assert (config_map["kind"], cron["kind"]) == ("ConfigMap", "RayCronJob")
    assert cron["spec"]["schedule"] == "0 2 * * *" and cron["spec"]["timeZone"] == "Europe/Berlin"
    template = cron["spec"]["jobTemplate"]
    assert template["rayClusterSpec"]["rayVersion"] == ray.__version__
    # The entrypoint names the job file the ConfigMap mounts on the head, and our CLI understands it.
    command = template["entrypoint"].split()
    assert command[:2] == ["lance-ray", "run"] and "--scheduled" in command
    args = build_parser().parse_args(command[1:])
    head = template["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = head["containers"][0]["volumeMounts"]
    (volume,) = head["volumes"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert args.job == f"{mount['mountPath']}/{job.name}"
    assert config_map["data"][job.name] == job.read_text()
    worker = template["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["image"] == head["containers"][0]["image"] == "registry.example/lance-ray:1"
    assert {"name": "HF_HOME", "value": "/cache/huggingface"} in worker["env"]
    assert "RayCronJob runs every due time" in notes  # overlap/catch_up it cannot honour are said


@pytest.mark.parametrize(("schedule", "policy", "deadline", "note"), [
    ('{cron: "*/15 * * * *"}', "Forbid", None, None),
    ('{cron: "0 2 * * 1", timezone: America/New_York, overlap: queue, catch_up: none}', "Forbid", 300,
     "cannot queue"),
    ('{cron: "30 1 1 * *", catch_up: all}', "Forbid", None, "only the newest"),
])
def test_cronjob_manifest_maps_the_schedule_policy(tmp_path: Path, capsys: pytest.CaptureFixture, schedule: str,
                                                   policy: str, deadline: int | None, note: str | None) -> None:
    job = _job(tmp_path, schedule)
    address = "http://lance-cluster-head-svc:8265"
    docs, notes = _emit(capsys, str(job), "--emit", "cronjob", "--address", address)
    for doc in docs:
        validate(doc)
    _, cron = docs
    spec = load_job(job).schedule
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == (spec.cron, spec.timezone)
    assert cron["spec"]["concurrencyPolicy"] == policy
    assert cron["spec"].get("startingDeadlineSeconds") == deadline
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(container["command"][1:])
    assert (args.command, args.address, args.scheduled, args.follow) == ("submit", address, True, True)
    assert (note is None) == ("note:" not in notes) and (note is None or note in notes)


def test_schemas_reject_what_kubernetes_would(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The validation means something: a misspelt field, a wrong type, a missing required field all fail."""
    for kind, extra in (("raycronjob", []), ("cronjob", ["--address", "http://h:8265"])):
        (_, cron), _ = _emit(capsys, str(_job(tmp_path)), "--emit", kind, *extra)
        for break_it in (lambda d: d["spec"].__setitem__("schedul", d["spec"].pop("schedule")),
                         lambda d: d["spec"].__setitem__("timeZone", 5),
                         lambda d: d["spec"].pop("jobTemplate")):
            broken = copy.deepcopy(cron)
            break_it(broken)
            with pytest.raises(jsonschema.ValidationError):
                validate(broken)


def test_emit_needs_a_schedule_an_address_and_never_replaces_a_foreign_file(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    no_schedule = tmp_path / "plain.yaml"
    no_schedule.write_text("name: plain\nsteps: [{name: a, task: t2i, input: {rows: [{prompt: x}]}}]\n")
    assert main(["schedule", str(no_schedule), "--emit", "raycronjob"]) == 2
    assert "no `schedule:` block" in capsys.readouterr().err
    job = _job(tmp_path)
    assert main(["schedule", str(job), "--emit", "cronjob"]) == 2
    assert "--address" in capsys.readouterr().err

    mine = tmp_path / "nightly.k8s.yaml"
    assert main(["schedule", str(job), "--emit", "raycronjob", "--out", str(mine)]) == 0
    assert main(["schedule", str(job), "--emit", "raycronjob", "--out", str(mine)]) == 0  # its own: replaced
    assert [d["kind"] for d in yaml.safe_load_all(mine.read_text())] == ["ConfigMap", "RayCronJob"]
    foreign = tmp_path / "mine.yaml"
    foreign.write_text("kind: Something\n")
    capsys.readouterr()
    assert main(["schedule", str(job), "--emit", "raycronjob", "--out", str(foreign)]) == 2
    assert foreign.read_text() == "kind: Something\n" and "not replacing it" in capsys.readouterr().err


def test_latest_due_is_the_schedulers_last_due_time() -> None:
    # schedule -> a window that holds at least one of its times
    schedules = {ScheduleSpec(cron="0 2 * * *", timezone="Europe/Berlin"): timedelta(days=2),
                 ScheduleSpec(cron="30 2 * * *", timezone="America/New_York"): timedelta(days=2),
                 ScheduleSpec(cron="*/7 * * * *"): timedelta(hours=1),
                 ScheduleSpec(cron="0 0 1 * *", timezone="Asia/Tokyo"): timedelta(days=32)}
    start = datetime(2026, 3, 1, tzinfo=timezone.utc)
    for schedule, window in schedules.items():
        for hours in range(0, 24 * 70, 13):  # across both 2026 daylight-saving changes in March
            moment = start + timedelta(hours=hours, minutes=hours % 60)
            expected = due_times(schedule, moment - window, moment)[-1]
            assert latest_due(schedule, moment) == expected, (schedule.cron, moment)
        due = due_times(schedule, start, start + window)[0]
        assert latest_due(schedule, due) == due  # due exactly now counts


def test_scheduled_run_context(tmp_path: Path) -> None:
    job = load_job(_job(tmp_path))
    # 2026-03-29: Berlin skips 02:00-03:00, so the 02:00 run happens at the jump, 01:00 UTC.
    run = scheduled_run(job, datetime(2026, 3, 29, 5, 0, tzinfo=timezone.utc))
    assert run.scheduled_for == datetime(2026, 3, 29, 1, 0, tzinfo=timezone.utc)
    assert (run.run_date, run.run_id, run.submission_id) == (
        "2026-03-29", "20260329T010000Z", "lance-ray-nightly_captions-20260329T010000Z")


@pytest.mark.slow
def test_the_cronjobs_command_submits_the_scheduled_run_once(jobs_head: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """What the CronJob's pod runs, against the session's Ray head: the run due last, under its run date
    and id, and a second submission of the same time refused by the cluster."""
    import shutil

    from lance_ray.cluster.remote import RemoteCluster
    from lance_ray.pipeline.sinks import read_step_output

    (tmp_path / "imgs").mkdir()
    shutil.copy(REPO_ROOT / "datasets" / "images" / "tiles_256x256.png", tmp_path / "imgs")
    job = tmp_path / "yearly.yaml"
    job.write_text(textwrap.dedent(f"""\
        name: yearly
        models: {{image: {{source: lance-tiny, backend: debug}}}}
        output: {tmp_path / "out" / "{run_date}" / "{run_id}"}
        schedule: {{cron: "0 0 1 1 *", timezone: Europe/Berlin}}
        steps:
          - {{name: caption, task: x2t_image, input: {{path: imgs}}}}
        """))
    run = scheduled_run(load_job(job))  # New Year in Berlin: the same until next year
    command = ["submit", str(job), "--address", jobs_head, "--scheduled", "--follow"]
    assert main(command) == 0, capsys.readouterr().err[-3000:]
    assert capsys.readouterr().out.splitlines()[0] == run.submission_id
    assert read_step_output(str(tmp_path / "out" / run.run_date / run.run_id / "caption")).num_rows == 1
    info = RemoteCluster(jobs_head).info(run.submission_id)
    assert info.status == "SUCCEEDED"
    assert info.metadata["lance_ray_scheduled_for"] == run.scheduled_for.isoformat()
    assert main(command) == 4  # the same scheduled time again: the cluster refuses it
    assert "refused" in capsys.readouterr().err
