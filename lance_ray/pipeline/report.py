"""`lance-ray report OUTPUT`: one self-contained HTML page of a run's results.

The page shows, for the newest run under OUTPUT (or the one asked for): per-step counts, rows/s and time
at the top; then a contact sheet per step, each row's output (caption text, image thumbnail, or a video's
poster frame with a short playable clip) beside its input and prompt; buttons that filter to failed
rows (with their errors) or one step; and a detail view (click a row) with its params, seed, model,
timing and the full input row. Media are embedded (downscaled JPEG thumbnails, H.264 clips as data
URIs), so the file can be mailed or archived on its own; links to the full-size files work where the
outputs are reachable from the browser.

What it reads is what a run wrote: `<output>/_runs/<run id>/summary.json` (the run summary, one per run),
`load-*.json` beside it (checkpoint loads), and each step's committed rows (`read_step_output`). The page
is written beside that run's summary, as `_runs/<run id>/report.html`.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from lance_ray.errors import InputError
from lance_ray.io import media, storage
from lance_ray.pipeline.sinks import read_step_output

SUMMARY_FILE = "summary.json"  # a run's summary in its events directory: the runner writes it, the report reads it
GENERATOR = "lance-ray report"  # in the page's <meta name="generator">: marks a file this module wrote
REPORT_NAME = "report.html"
THUMB_PX = 192  # longest side of an embedded thumbnail
CLIP_PX = 240  # longest side of an embedded clip
CLIP_SECONDS = 4.0  # the start of a video, embedded as a clip
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v")


@dataclass
class StepReport:
    name: str
    task: str
    output: str
    rows: list[dict]  # committed rows shown (failed first), each an OUTPUT_SCHEMA row
    committed: int = 0
    ok: int = 0
    failed: int = 0
    run: dict = field(default_factory=dict)  # this step in the run summary (rows/s, time, skipped)


@dataclass
class RunReport:
    output: str
    summary: dict  # the run summary (runner.RunSummary as JSON)
    steps: list[StepReport]
    loads: list[dict]  # checkpoint loads of the run's actors


def _read_json(uri: str) -> dict:
    fs, path = storage.filesystem_for(uri)
    with fs.open(path, "rb") as f:
        return json.load(f)


def run_dirs(output: str) -> dict[str, str]:
    """run id -> events directory of every run under `output` that finished with a summary."""
    fs, root = storage.filesystem_for(storage.join_uri(output, "_runs"))
    fs.invalidate_cache(root)
    found = fs.glob(f"{root}/*/{SUMMARY_FILE}") if fs.exists(root) else []
    return {PurePosixPath(path).parent.name: storage.join_uri(output, "_runs", PurePosixPath(path).parent.name)
            for path in found}


def collect(output: str, run_id: str | None = None, max_rows: int = 100) -> RunReport:
    """The data of the page: the newest run's summary (or `run_id`'s), and each of its steps' committed rows
    (at most `max_rows` per step, failed rows first)."""
    dirs = run_dirs(output)
    runs = {rid: _read_json(storage.join_uri(events, SUMMARY_FILE)) for rid, events in dirs.items()}
    if not runs:
        raise InputError(f"{output}: no finished lance-ray run here (no _runs/*/{SUMMARY_FILE}); give the "
                         "job's output root (its `output:`, or run --output)")
    if run_id is None:
        run_id = max(runs, key=lambda rid: (runs[rid].get("finished_at") or "", rid))
    elif run_id not in runs:
        raise InputError(f"{output}: no run {run_id!r} (runs: {', '.join(sorted(runs))})")
    summary = runs[run_id]
    steps = []
    for step in summary["steps"]:
        table = read_step_output(step["output"]).to_pylist()
        failed = [row for row in table if row["error"]]
        ok = [row for row in table if not row["error"]]
        steps.append(StepReport(step["name"], step["task"], step["output"], (failed + ok)[:max_rows],
                                committed=len(table), ok=len(ok), failed=len(failed), run=step))
    fs, root = storage.filesystem_for(dirs[run_id])
    loads = [_read_json(storage.to_uri(fs, path)) for path in sorted(fs.glob(f"{root}/load-*.json"))]
    return RunReport(output, summary, steps, loads)


# ------------------------------------------------------------------------------------------- media


def _downscale(pixels: np.ndarray, longest: int) -> np.ndarray:
    from PIL import Image

    height, width = pixels.shape[:2]
    scale = min(1.0, longest / max(height, width))
    if scale == 1.0:
        return pixels
    size = (max(2, round(width * scale)), max(2, round(height * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))


def _jpeg_uri(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_downscale(pixels, THUMB_PX)).save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _is_video(uri: str) -> bool:
    return uri.lower().endswith(VIDEO_EXTENSIONS)


def media_html(uri: str | None, label: str) -> str:
    """An image thumbnail, or a video's poster frame with its first seconds as a playable clip; a note
    when the file cannot be read (the page is still written)."""
    if not uri:
        return ""
    try:
        if not _is_video(uri):
            return f'<img class="thumb" alt="{html.escape(label)}" src="{_jpeg_uri(media.decode_image(uri))}">'
        info = media.probe_video(uri)
        count = max(1, min(info.num_frames, round(CLIP_SECONDS * info.fps)))
        frames = media.decode_video(uri, range(count))
        clip = np.stack([_downscale(frame, CLIP_PX) for frame in frames])
        data, _ = media.encode_video(clip, info.fps, "h264", crf=30)
        return (f'<video class="thumb" controls muted loop playsinline preload="auto" title="{html.escape(label)}" '
                f'poster="{_jpeg_uri(frames[0])}" src="data:video/mp4;base64,{base64.b64encode(data).decode()}">'
                "</video>")
    except Exception as exc:  # a missing or broken file must not stop the report
        return f'<p class="missing">{html.escape(label)}: cannot show {html.escape(uri)} ({html.escape(str(exc))})</p>'


# -------------------------------------------------------------------------------------------- page


def _fmt_seconds(seconds: float | None) -> str:
    return "—" if not seconds else f"{seconds:.1f}s"


def _row_card(step: StepReport, row: dict) -> str:
    status = "failed" if row["error"] else "ok"
    prompt = row["prompt"] or ""
    inputs = media_html(row["image"] or row["video"], "input")
    if row["error"]:
        result = f'<p class="error">{html.escape(row["error"])}</p>'
    elif row["text"] is not None:
        result = f'<p class="text">{html.escape(row["text"])}</p>'
    else:
        result = media_html(row["media_uri"], "output")
    params = json.loads(row["params"]) if row["params"] else {}
    facts = {
        "row id": row["row_id"], "step": step.name, "task": row["task"], "seed": row["seed"],
        "model": f"{row['model_id'] or ''} {row['model_revision'] or ''} ({row['backend'] or ''})".strip(),
        "started at": row["started_at"], "model time per row": _fmt_seconds(row["elapsed_s"]),
        "output file": row["media_uri"], "input image": row["image"], "input video": row["video"],
        "error": row["error"],
    }
    fact_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                        for k, v in facts.items() if v not in (None, ""))
    link = (f'<p><a href="{html.escape(row["media_uri"])}">full-size output</a></p>'
            if row["media_uri"] and storage.is_local(row["media_uri"]) else "")
    detail = (f"<h3>{html.escape(row['row_id'])}</h3><table>{fact_rows}</table>"
              f"<h4>prompt</h4><p>{html.escape(prompt) or '<i>none</i>'}</p>"
              f"<h4>params</h4><pre class='params'>{html.escape(json.dumps(params, indent=2, sort_keys=True))}</pre>"
              f"<h4>input row</h4><pre>{html.escape(row['input_row'] or '')}</pre>{link}")
    return (f'<article class="card {status}" data-step="{html.escape(step.name)}" data-status="{status}" '
            f'data-row-id="{html.escape(row["row_id"])}" tabindex="0">'
            f'<div class="input">{inputs}<p class="prompt">{html.escape(prompt)}</p></div>'
            f'<div class="result">{result}</div>'
            f'<p class="meta">{html.escape(row["row_id"])} · seed {row["seed"]}</p>'
            f'<template class="detail">{detail}</template></article>')


def render(report: RunReport) -> str:
    summary = report.summary
    head_rows = "".join(
        f"<tr data-step='{html.escape(s.name)}'><td>{html.escape(s.name)}</td><td>{s.task}</td>"
        f"<td class='n'>{s.run.get('rows', '')}</td><td class='n ok'>{s.run.get('ok', 0)}</td>"
        f"<td class='n failed'>{s.run.get('failed', 0)}</td><td class='n'>{s.run.get('skipped', 0)}</td>"
        f"<td class='n'>{_rate(s.run)}</td><td class='n'>{_fmt_seconds(s.run.get('elapsed_s'))}</td>"
        f"<td class='n'>{s.committed}</td><td class='n'>{s.failed}</td></tr>"
        for s in report.steps)
    loads = ", ".join(f"{load.get('family')} {load.get('load_s')}s ({load.get('backend')})" for load in report.loads)
    sections = "".join(
        f"<section class='step' data-step='{html.escape(s.name)}'><h2>{html.escape(s.name)} "
        f"<small>{s.task} · {s.ok} ok, {s.failed} failed"
        f"{f' · showing {len(s.rows)} of {s.committed}' if len(s.rows) < s.committed else ''}</small></h2>"
        f"<div class='sheet'>{''.join(_row_card(s, row) for row in s.rows)}</div></section>"
        for s in report.steps)
    options = "".join(f"<option value='{html.escape(s.name)}'>{html.escape(s.name)}</option>" for s in report.steps)
    title = f"{summary['job']} · run {summary['run_id']}"
    ok = sum(s["ok"] for s in summary["steps"])
    return _PAGE.format(
        generator=GENERATOR, title=html.escape(title), output=html.escape(report.output),
        finished=html.escape(str(summary.get("finished_at") or "")), elapsed=_fmt_seconds(summary.get("elapsed_s")),
        ok=ok, failed=summary.get("failed", 0), loads=html.escape(loads or "none this run"),
        head_rows=head_rows, options=options, sections=sections, css=_CSS, js=_JS,
    )


def _rate(step: dict) -> str:
    done, elapsed = step.get("ok", 0) + step.get("failed", 0), step.get("elapsed_s") or 0
    return f"{done / elapsed:.2f}" if elapsed else "—"


def write_report(output: str, dest: str | None = None, run_id: str | None = None, max_rows: int = 100) -> str:
    """Writes the page (beside the run's summary unless `dest`) and returns where. Never replaces a file
    that this module did not write."""
    report = collect(output, run_id, max_rows)
    if dest is None:
        dest = storage.join_uri(output, "_runs", report.summary["run_id"], REPORT_NAME)
    fs, path = storage.filesystem_for(dest)
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            if f'<meta name="generator" content="{GENERATOR}">'.encode() not in f.read(4096):
                raise InputError(f"{dest} exists and is not a lance-ray report; not replacing it")
    storage.write_bytes_atomic(dest, render(report).encode())
    return dest


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 small { font-weight: normal; color: #666; font-size: .7em; }
table.steps { border-collapse: collapse; margin: .8em 0; } table.steps td, table.steps th { padding: .2em .7em;
  border-bottom: 1px solid #ddd; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.failed { color: #b00020; } td.ok { color: #1b7a1b; }
#filters { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ddd; z-index: 1; }
#filters button { padding: .3em .9em; border: 1px solid #888; background: #f4f4f4; cursor: pointer; }
#filters button.on { background: #333; color: #fff; }
.sheet { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: .8em; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: .6em; display: grid;
  grid-template-columns: 1fr 1fr; gap: .6em; cursor: pointer; }
.card.failed { border-color: #b00020; background: #fff5f6; }
.card .meta { grid-column: 1 / 3; margin: 0; color: #777; font-size: .85em; }
.thumb { max-width: 100%; max-height: 200px; display: block; }
.prompt { color: #444; font-style: italic; margin: .3em 0 0; } .text { margin: 0; white-space: pre-wrap; }
.error { color: #b00020; margin: 0; white-space: pre-wrap; font-family: monospace; } .missing { color: #999; }
dialog { max-width: 60em; width: 90%; } dialog pre { background: #f6f6f6; padding: .5em; overflow: auto; }
dialog th { text-align: left; padding-right: 1em; vertical-align: top; }
[hidden] { display: none !important; }
"""

_JS = """
const cards = [...document.querySelectorAll('.card')];
let status = 'all';
function apply() {
  const step = document.getElementById('step').value;
  let shown = 0;
  for (const card of cards) {
    card.hidden = !((status === 'all' || card.dataset.status === status) && (!step || card.dataset.step === step));
    if (!card.hidden) shown++;
  }
  for (const section of document.querySelectorAll('section.step'))
    section.hidden = !section.querySelector('.card:not([hidden])');
  document.getElementById('shown').textContent = shown;
}
for (const button of document.querySelectorAll('#filters button')) {
  button.addEventListener('click', () => {
    status = button.dataset.status;
    for (const b of document.querySelectorAll('#filters button')) b.classList.toggle('on', b === button);
    apply();
  });
}
document.getElementById('step').addEventListener('change', apply);
const dialog = document.getElementById('detail');
function open(card) {
  dialog.querySelector('.body').replaceChildren(card.querySelector('template.detail').content.cloneNode(true));
  dialog.showModal();
}
for (const card of cards) {
  card.addEventListener('click', event => { if (!event.target.closest('video')) open(card); });
  card.addEventListener('keydown', event => { if (event.key === 'Enter') open(card); });
}
dialog.querySelector('button').addEventListener('click', () => dialog.close());
apply();
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="{generator}">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title><style>{css}</style></head>
<body>
<header><h1>{title}</h1>
<p>{output} · finished {finished} · {elapsed} · <b>{ok}</b> ok, <b>{failed}</b> failed this run ·
checkpoint loads: {loads}</p>
<table class="steps"><thead><tr><th>step</th><th>task</th><th>rows</th><th>ok</th><th>failed</th><th>skipped</th>
<th>rows/s</th><th>time</th><th>committed</th><th>failed (all runs)</th></tr></thead><tbody>{head_rows}</tbody></table>
</header>
<nav id="filters"><button class="on" data-status="all">all</button><button data-status="ok">ok</button>
<button data-status="failed">failed</button>
<select id="step"><option value="">every step</option>{options}</select> <span id="shown"></span> rows shown
· click a row for its params, seed and details</nav>
<main>{sections}</main>
<dialog id="detail"><button>close</button><div class="body"></div></dialog>
<script>{js}</script>
</body></html>
"""
