"""`lance-ray export`: a finished suite step's outputs, laid out where the benchmark's evaluator reads them.

    geneval  <dir>/<index:05d>/metadata.jsonl, <dir>/<index:05d>/samples/<n:04d>.png
    dpg      <dir>/<index>.png: the case's samples tiled two per row (evaluate with --pic-num N --resolution <side>)
    vbench   <dir>/<prompt>-<n>.mp4 (the benchmark's own prompt, `original_prompt_en` / `prompt_en`)
    gedit    <dir>/fullset/<task_type>/<instruction_language>/<key>.png

(Sources of each layout: `lance_ray.spec.suites`.) A suite step's row ids are `<case index>-<sample>`,
and each output row keeps its input record (`input_row`), which is all a layout needs.

The export never overwrites or deletes a file it did not write. It records what it writes in
`<dir>/.lance-ray-export.json` (path → SHA-256 of each version it wrote, recorded before the file is
written): a file in the way whose content is not one of those is left alone and reported. Running the
export again rewrites only its own files, and only those whose content changed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lance_ray.errors import JobFileError
from lance_ray.io import media, storage
from lance_ray.pipeline import sinks
from lance_ray.spec import Job, Step
from lance_ray.spec.inputs import MISSING, column_value
from lance_ray.spec.suites import SUITES

RECORD_NAME = ".lance-ray-export.json"
VBENCH_NAME_COLUMNS = ("original_prompt_en", "prompt_en", "prompt")  # the benchmark's prompt, for file names
_MAX_NAME_BYTES = 255  # a file name on common filesystems


@dataclass
class ExportReport:
    suite: str
    target: str
    written: int = 0
    unchanged: int = 0
    problems: list[str] = field(default_factory=list)  # cases or files not exported, and why


@dataclass(frozen=True)
class Sample:
    case: str  # the case index (row id before `-<n>`)
    n: int
    record: dict  # the input record
    row: dict  # the output row


def suite_step(job: Job, name: str | None) -> Step:
    """The step to export: `name`, or the job's only suite step."""
    if name is not None:
        step = next((s for s in job.steps if s.name == name), None)
        if step is None:
            raise JobFileError(f"job {job.name} has no step {name!r} (steps: {', '.join(s.name for s in job.steps)})")
        if step.input.suite is None:
            raise JobFileError(f"step {name!r} does not read a benchmark suite (input.suite); nothing to lay out")
        return step
    steps = [s for s in job.steps if s.input.suite is not None]
    if len(steps) != 1:
        found = ", ".join(s.name for s in steps) or "none"
        raise JobFileError(f"job {job.name}: name the step to export with --step (suite steps: {found})")
    return steps[0]


def export_step(job: Job, step: Step, target: str | Path) -> ExportReport:
    """Lays out `step`'s committed, error-free outputs under `target` for its suite's evaluator."""
    suite = SUITES[step.input.suite or ""]
    root = Path(target)
    report = ExportReport(suite.name, str(root))
    samples: list[Sample] = []
    for row in sinks.read_step_output(step.output_path(job)).to_pylist():
        case, _, n = row["row_id"].rpartition("-")
        if row["error"] is not None or not n.isdigit():
            report.problems.append(f"{row['row_id']}: not exported ({row['error'] or 'not a suite row id'})")
            continue
        samples.append(Sample(case, int(n), json.loads(row["input_row"] or "{}"), row))
    files = _LAYOUTS[suite.name](samples, report)
    _write(root, files, report)
    return report


# ------------------------------------------------------------------------------------------ layouts


def _geneval(samples: list[Sample], report: ExportReport) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for sample in samples:
        if not sample.case.isdigit():
            report.problems.append(f"case {sample.case!r}: GenEval folders are numbered; this index is not a number")
            continue
        folder = f"{int(sample.case):05d}"
        info = sample.record.get("additional_info")
        metadata = info if isinstance(info, dict) else sample.record  # Lance's file / GenEval's own line
        files[f"{folder}/metadata.jsonl"] = (json.dumps(metadata, ensure_ascii=False) + "\n").encode()
        files[f"{folder}/samples/{sample.n:04d}.png"] = _media_bytes(sample.row)
    return files


def _dpg(samples: list[Sample], report: ExportReport) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    by_case: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_case[sample.case].append(sample)
    for case, members in sorted(by_case.items()):
        members.sort(key=lambda s: s.n)
        if [s.n for s in members] != list(range(len(members))) or len(members) > 4:
            report.problems.append(f"case {case!r}: DPG-Bench tiles samples 0-3; this case has {[s.n for s in members]}")
            continue
        tiles = [media.decode_image(s.row["media_uri"]) for s in members]
        if len({t.shape for t in tiles}) != 1 or tiles[0].shape[0] != tiles[0].shape[1]:
            report.problems.append(f"case {case!r}: DPG-Bench crops square tiles of one size; "
                                   f"got {[t.shape[:2] for t in tiles]}")
            continue
        if name := _safe_name(case, report):
            files[f"{name}.png"] = media.encode_png(_tile(tiles))
    return files


def _tile(tiles: list[np.ndarray]) -> np.ndarray:
    """Tiles two per row, left to right then top to bottom (the evaluator's crop order); white where a
    row is short, as torchvision's make_grid pads."""
    side = tiles[0].shape[0]
    columns = 1 if len(tiles) == 1 else 2
    grid = np.full((math.ceil(len(tiles) / columns) * side, columns * side, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        row, col = divmod(i, columns)
        grid[row * side:(row + 1) * side, col * side:(col + 1) * side] = tile
    return grid


def _vbench(samples: list[Sample], report: ExportReport) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for sample in samples:
        name = next((v for c in VBENCH_NAME_COLUMNS if isinstance(v := column_value(sample.record, c), str) and v),
                    None)
        if name is None:
            report.problems.append(f"case {sample.case!r}: no {' / '.join(VBENCH_NAME_COLUMNS)} to name its videos by")
            continue
        if not str(sample.row["media_uri"]).endswith(".mp4"):
            report.problems.append(f"case {sample.case!r}: VBench reads .mp4 files; run the step with "
                                   "output.video_codec h264")
            continue
        file_name = _safe_name(f"{name}-{sample.n}.mp4", report)
        if file_name:
            files[file_name] = _media_bytes(sample.row)
    return files


def _gedit(samples: list[Sample], report: ExportReport) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for sample in samples:
        parts = [column_value(sample.record, f"additional_info.{k}") for k in ("task_type", "instruction_language", "key")]
        if any(p is MISSING or not isinstance(p, str) or not p for p in parts):
            report.problems.append(f"case {sample.case!r}: additional_info needs task_type, instruction_language "
                                   "and key")
            continue
        names = [_safe_name(p, report) for p in parts]
        if all(names):
            files[f"fullset/{names[0]}/{names[1]}/{names[2]}.png"] = _media_bytes(sample.row)
    return files


_LAYOUTS = {"geneval": _geneval, "dpg": _dpg, "vbench": _vbench, "gedit": _gedit}


def _safe_name(name: str, report: ExportReport) -> str:
    """`name` as one path component, or '' (reported) when it cannot be one."""
    if "/" in name or "\0" in name or name in (".", "..") or len(name.encode()) > _MAX_NAME_BYTES or not name:
        report.problems.append(f"{name[:80]!r}: cannot be a file name")
        return ""
    return name


def _media_bytes(row: dict) -> bytes:
    fs, path = storage.filesystem_for(row["media_uri"])
    with fs.open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------------------------------- writing


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write(root: Path, files: dict[str, bytes], report: ExportReport) -> None:
    record_path = root / RECORD_NAME
    if record_path.is_symlink() or (record_path.exists() and not record_path.is_file()):
        raise JobFileError(f"{record_path}: exists and is not a regular file; export elsewhere")
    ours: dict[str, list[str]] = json.loads(record_path.read_text())["files"] if record_path.exists() else {}
    todo: dict[str, bytes] = {}
    for rel, data in sorted(files.items()):
        path = root / rel
        if path.is_symlink() or (path.exists() and not path.is_file()):
            report.problems.append(f"{rel}: exists and is not a regular file; left alone")
        elif not path.exists():
            todo[rel] = data
        elif (current := _file_sha256(path)) == _sha256(data):
            report.unchanged += 1
        elif current in ours.get(rel, []):
            todo[rel] = data
        else:
            report.problems.append(f"{rel}: exists and was not written by lance-ray export (or was changed since); "
                                   "left alone")
    for rel, data in todo.items():  # recorded before written: a killed export still knows its files
        ours[rel] = sorted(set(ours.get(rel, [])) | {_sha256(data)})
    _save_record(record_path, ours)
    for rel, data in todo.items():
        storage.write_bytes_atomic(str(root / rel), data)
        report.written += 1


def _save_record(record_path: Path, ours: dict[str, list[str]]) -> None:
    record_path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(str(record_path), json.dumps({"files": ours}, indent=1, sort_keys=True).encode())


def format_report(report: ExportReport, limit: int = 20) -> Iterable[str]:
    yield f"{report.suite} layout in {report.target}: {report.written} file(s) written, {report.unchanged} unchanged"
    for problem in report.problems[:limit]:
        yield f"  not exported: {problem}"
    if len(report.problems) > limit:
        yield f"  ... and {len(report.problems) - limit} more"

