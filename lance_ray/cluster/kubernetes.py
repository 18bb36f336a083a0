"""Kubernetes manifests that run a job file on its `schedule:` (`lance-ray schedule JOB --emit KIND`).

Two kinds, beside the built-in scheduler (schedule.py), which needs a process of its own:

* `raycronjob`: a KubeRay `RayCronJob` (KubeRay >= 1.6). At each time it creates a `RayJob`: a Ray cluster
  of its own (CPU head, GPU workers from zero) that runs `lance-ray run --scheduled` and is deleted after.
* `cronjob`: a Kubernetes `CronJob` whose pod runs `lance-ray submit --scheduled --follow` against a
  long-lived Ray cluster (a KubeRay `RayCluster`), so the pod lasts as long as the run.

Both come with a ConfigMap holding the job file, mounted at /jobs. `--scheduled` makes the run the one the
schedule had due last: its `{run_date}`, `{run_id}` (and submission id) are those the built-in scheduler
would give it. How the job file's `overlap` and `catch_up` map onto each kind, and where they cannot, is
said in `Manifests.notes`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lance_ray import __version__
from lance_ray.errors import JobFileError
from lance_ray.spec import Job

Kind = Literal["raycronjob", "cronjob"]
KINDS: tuple[Kind, ...] = ("raycronjob", "cronjob")
DEFAULT_IMAGE = f"ghcr.io/your-org/lance-ray:{__version__}"  # an image with lance-ray installed (docs/deploy.md)
JOB_MOUNT = "/jobs"
CACHE_MOUNT = "/cache"
# A CronJob's Jobs are named <name>-<11 characters>, within the 63 of a label value.
MAX_NAME = 52
# A run due longer ago than this when the controller gets to it is skipped (`catch_up: none`).
STARTING_DEADLINE_S = 300


class ManifestError(JobFileError):
    """The job file cannot be run on a schedule by Kubernetes (no `schedule:` block)."""


@dataclass
class Manifests:
    documents: list[dict]
    notes: list[str] = field(default_factory=list)  # what the user must know: mapping gaps, local paths

    def to_yaml(self) -> str:
        import yaml

        class Dumper(yaml.SafeDumper):
            def ignore_aliases(self, data: object) -> bool:  # no &anchors: each manifest reads on its own
                return True

        def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:  # the job file as a `|` block
            style = "|" if "\n" in value else None
            return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

        Dumper.add_representer(str, text)
        header = "".join(f"# NOTE: {note}\n" for note in self.notes)
        return header + "".join("---\n" + yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=110)
                                for doc in self.documents)


def resource_name(job_name: str) -> str:
    """A Kubernetes name (DNS-1123: lower-case letters, digits, '-') from a job name."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"lance-{job_name}".lower()).strip("-")
    return name[:MAX_NAME].rstrip("-")


def _local_paths(job: Job) -> list[str]:
    paths = [path for step in job.steps for path in (step.input.path or []) if "://" not in path]
    outputs = {job.output, *(step.output_path(job) for step in job.steps)}
    return paths + sorted(path for path in outputs if "://" not in path)


def _config_map(name: str, job_path: Path) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-job", "labels": {"app.kubernetes.io/part-of": "lance-ray"}},
        "data": {job_path.name: job_path.read_text(encoding="utf-8")},
    }


def _job_volume(name: str) -> tuple[dict, dict]:
    """The ConfigMap as a volume, and its mount."""
    return ({"name": "job-file", "configMap": {"name": f"{name}-job"}},
            {"name": "job-file", "mountPath": JOB_MOUNT, "readOnly": True})


def _ray_cluster_spec(name: str, image: str, max_gpus: int) -> dict:
    import ray

    volume, mount = _job_volume(name)
    return {
        "rayVersion": ray.__version__,
        "enableInTreeAutoscaling": True,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "2"},
            "template": {"spec": {
                "containers": [{
                    "name": "ray-head",
                    "image": image,
                    "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
                    "volumeMounts": [mount],  # the driver runs on the head and reads the job file
                }],
                "volumes": [volume],
            }},
        },
        "workerGroupSpecs": [{
            "groupName": "gpu",
            "replicas": 0,
            "minReplicas": 0,
            "maxReplicas": max_gpus,  # one Lance actor per GPU
            "rayStartParams": {},
            "template": {"spec": {
                "containers": [{
                    "name": "ray-worker",
                    "image": image,
                    "env": [{"name": "LANCE_RAY_CACHE", "value": CACHE_MOUNT},
                            {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"}],
                    "resources": {"requests": {"cpu": "7", "memory": "56Gi", "nvidia.com/gpu": "1"},
                                  "limits": {"cpu": "7", "memory": "56Gi", "nvidia.com/gpu": "1"}},
                    "volumeMounts": [{"name": "cache", "mountPath": CACHE_MOUNT}],
                }],
                "volumes": [{"name": "cache", "emptyDir": {"sizeLimit": "100Gi"}}],
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            }},
        }],
    }


def schedule_manifests(job_path: str | Path, job: Job, kind: Kind, *, image: str = DEFAULT_IMAGE,
                       address: str | None = None, max_gpus: int = 8) -> Manifests:
    """The ConfigMap and the RayCronJob or CronJob that run `job` (loaded from `job_path`) on its schedule.
    A `cronjob` submits to the Ray cluster whose Jobs API is at `address`."""
    if job.schedule is None:
        raise ManifestError(f"{job_path}: the job file has no `schedule:` block "
                            "(e.g. schedule: {cron: '0 2 * * *', timezone: UTC})")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    job_path = Path(job_path)
    name = resource_name(job.name)
    schedule = job.schedule
    job_file = f"{JOB_MOUNT}/{job_path.name}"
    notes = [f"`{path}` is a local path: on Kubernetes it must exist in the pods (use s3:// or a volume)"
             for path in _local_paths(job)]
    labels = {"app.kubernetes.io/part-of": "lance-ray", "lance-ray/job": name.removeprefix("lance-")}
    if kind == "raycronjob":
        notes.append("RayCronJob runs every due time, each on a Ray cluster of its own: runs may overlap and "
                     f"missed times all run (the job file says overlap: {schedule.overlap}, catch_up: "
                     f"{schedule.catch_up}); use --emit cronjob or the built-in scheduler to honour them")
        manifest = {
            "apiVersion": "ray.io/v1",
            "kind": "RayCronJob",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "schedule": schedule.cron,
                "timeZone": schedule.timezone,
                "jobTemplate": {
                    "entrypoint": f"lance-ray run {job_file} --scheduled --no-progress",
                    "shutdownAfterJobFinishes": True,
                    "ttlSecondsAfterFinished": 600,
                    "rayClusterSpec": _ray_cluster_spec(name, image, max_gpus),
                },
            },
        }
    else:
        if not address:
            raise ManifestError("--emit cronjob submits to a running Ray cluster: give its Jobs API with "
                                "--address (e.g. http://lance-cluster-head-svc:8265)")
        if schedule.overlap == "queue":
            notes.append("a Kubernetes CronJob cannot queue a run behind the previous one: it is skipped "
                         "(concurrencyPolicy: Forbid), as overlap: skip would")
        if schedule.catch_up == "all":
            notes.append("a Kubernetes CronJob runs only the newest of the times it missed (catch_up: latest), "
                         "not all of them")
        volume, mount = _job_volume(name)
        spec: dict = {
            "schedule": schedule.cron,
            "timeZone": schedule.timezone,
            # The pod follows the run to its end, so Forbid means: no new run while one is unfinished.
            "concurrencyPolicy": "Forbid",
            "jobTemplate": {"spec": {
                "backoffLimit": 0,  # a failed run is not resubmitted by Kubernetes; the next time comes
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{
                            "name": "submit",
                            "image": image,
                            "command": ["lance-ray", "submit", job_file, "--address", address, "--scheduled",
                                        "--follow"],
                            "volumeMounts": [mount],
                        }],
                        "volumes": [volume],
                    },
                },
            }},
        }
        if schedule.catch_up == "none":
            spec["startingDeadlineSeconds"] = STARTING_DEADLINE_S
        manifest = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": name, "labels": labels},
                    "spec": spec}
    return Manifests([_config_map(name, job_path), manifest], notes)
