"""Prometheus metrics of a real run: `lance-ray run --address` on the session's Ray head, the tiny Lance
checkpoint on CPU, and the head's metrics endpoint scraped and checked against the Parquet output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO_ROOT, RayHead, head_env, wait_for
from prometheus_client.parser import text_string_to_metric_families

from lance_ray.pipeline.metrics import METRICS, PREFIX
from lance_ray.pipeline.sinks import read_step_output

SAMPLE_IMAGES = REPO_ROOT / "datasets" / "images"
DASHBOARD = REPO_ROOT / "deploy" / "grafana-dashboard.json"


def exported_name(name: str) -> str:
    """How Ray exports a metric of ours: `ray_` in front, `_total` behind a counter."""
    kind = METRICS[name][0]
    return f"ray_{PREFIX}{name}" + ("_total" if kind == "counter" else "")


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)] of every lance-ray sample on the endpoint."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_" + PREFIX):
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples, name: str, **labels: str) -> float:
    return sum(value for sample_labels, value in samples.get(name, [])
               if all(sample_labels.get(k) == v for k, v in labels.items()))


@pytest.mark.slow
def test_metrics_of_a_real_run_are_scraped_from_the_node(ray_head: RayHead, tiny_ckpt: Path, tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_text(f"""
name: metered
models: {{image: {{source: {tiny_ckpt}, precision: float32}}}}
output: {tmp_path / 'out'}
steps:
  - name: draw
    task: t2i
    input: {{rows: [{{prompt: a red kite}}, {{prompt: a blue boat}}, {{prompt: ""}}]}}
    params: {{height: 32, width: 32, steps: 3}}
    resources: {{batch_size: 2}}
  - name: describe
    task: x2t_image
    input: {{path: {SAMPLE_IMAGES}, limit: 3}}
    params: {{preset: image_256res, max_new_tokens: 4}}
""")
    run = subprocess.run([sys.executable, "-m", "lance_ray.cli", "run", str(job), "--address", ray_head.gcs,
                          "--no-progress"], cwd=REPO_ROOT, env=head_env(ray_head.temp_dir), capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 1, run.stderr[-3000:]  # the empty prompt fails its row

    draw = read_step_output(str(tmp_path / "out" / "draw")).to_pylist()
    describe = read_step_output(str(tmp_path / "out" / "describe")).to_pylist()
    ok = {"draw": sum(r["error"] is None for r in draw), "describe": sum(r["error"] is None for r in describe)}
    assert ok == {"draw": 2, "describe": 3}

    committed = exported_name("rows_committed")
    # The driver has exited; the node keeps exporting what it recorded. Wait for its last report.
    samples = wait_for(lambda: (s := scrape(ray_head.metrics))
                       and total(s, committed, job="metered") == len(draw) + len(describe) and s,
                       what="the run's committed rows on the metrics endpoint")
    assert total(samples, committed, step="draw", status="ok") == 2
    assert total(samples, committed, step="draw", status="failed") == 1
    assert total(samples, committed, step="describe", task="x2t_image", status="ok") == 3
    assert total(samples, exported_name("rows_pending"), job="metered") == 0
    assert total(samples, exported_name("rows_per_second"), step="draw") > 0

    # Every row went through prepare and reached an actor: nothing is left queued in front of the model.
    for step, rows in (("draw", 3), ("describe", 3)):
        assert total(samples, exported_name("rows_prepared"), step=step) == rows
        assert total(samples, exported_name("rows_received"), step=step) == rows

    # Model calls: the histogram's count is the number of calls, its buckets their sizes (Ray's `_sum` of a
    # histogram is estimated from bucket midpoints, so it is not checked).
    calls = exported_name("model_batch_rows")
    assert total(samples, calls + "_count", step="draw") == 1  # batch_size 2, and the failed row never ran
    assert (total(samples, calls + "_bucket", step="draw", le="1.0"),
            total(samples, calls + "_bucket", step="draw", le="2.0")) == (0, 1)  # that call had 2 rows
    assert total(samples, calls + "_count", step="describe") == 1
    assert (total(samples, calls + "_bucket", step="describe", le="2.0"),
            total(samples, calls + "_bucket", step="describe", le="4.0")) == (0, 1)  # 3 rows
    assert total(samples, exported_name("denoising_steps"), step="draw") == 2 * 3
    assert total(samples, exported_name("denoising_steps_per_second"), step="draw") > 0

    from lance_ray.models.lance.tokenizer import LanceTokenizer

    tokenizer = LanceTokenizer(tiny_ckpt / "Lance_3B")
    tokens = sum(len(tokenizer.encode(r["text"])) for r in describe if r["text"])
    assert total(samples, exported_name("generated_tokens"), step="describe") == tokens
    if tokens:
        assert total(samples, exported_name("tokens_per_second"), step="describe") > 0

    (load,) = samples[exported_name("checkpoint_load_seconds")]
    assert load[0]["family"] == "image" and load[0]["backend"] == "lance" and load[1] > 0
    assert total(samples, exported_name("actor_memory_bytes"), kind="host_rss") > 0
    busy = samples[exported_name("actor_busy_ratio")]
    assert busy and all(0 < value <= 1 for _, value in busy)
    assert total(samples, exported_name("model_seconds"), step="draw") > 0


def test_grafana_dashboard_charts_every_metric_and_only_ours() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert expressions
    named = {name for expr in expressions for name in re.findall(r"ray_lance_ray_[a-z_]+", expr)}
    known = {exported_name(name) for name in METRICS}
    known |= {exported_name(name) + suffix for name, (kind, _, _) in METRICS.items() if kind == "histogram"
              for suffix in ("_bucket", "_sum", "_count")}
    assert named <= known, named - known
    charted = {name for name in METRICS if any(exported_name(name) in expr for expr in expressions)}
    assert charted == set(METRICS)
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "job"}
