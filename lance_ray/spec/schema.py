"""Generated documentation of the job file: the JSON Schema and the task/param tables of specs/README.md.

Both come from the models and the task registry, so they cannot drift from the code:

    python -m lance_ray.spec.schema --write     # rewrite specs/job.schema.json and the tables
    python -m lance_ray.spec.schema --check     # exit 1 if either is stale (the tests do the same)

In specs/README.md each generated table sits between `<!-- generated: NAME -->` and
`<!-- end generated -->`; everything else on that page is written by hand.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from lance_ray.models.lance import PRESETS, TASKS, Params
from lance_ray.spec.models import Job

SPECS_DIR = Path(__file__).resolve().parents[2] / "specs"
_BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n).*?(<!-- end generated -->)", re.S)


def job_json_schema() -> dict[str, Any]:
    """JSON Schema of a job file (what `specs/job.schema.json` holds)."""
    schema = Job.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lance-ray job"
    return schema


def schema_text() -> str:
    return json.dumps(job_json_schema(), indent=2, ensure_ascii=False) + "\n"


def _value(value: Any) -> str:
    if value is None:
        return "—"
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def tasks_table() -> str:
    """What each task reads from a row and writes."""
    lines = ["| task | family | a row needs | writes | default batch |", "|---|---|---|---|---|"]
    for task in TASKS.values():
        prompt = task.prompt_name if task.prompt_required else f"optional {task.prompt_name}"
        needs = f"{task.input_media} + {prompt}" if task.input_media else prompt
        if task.multi_turn:
            needs += " (or `turns`)"
        writes = {"text": "text", "image": "PNG", "video": "MP4 (or MKV)"}[task.output]
        lines.append(f"| `{task.name}` | {task.family} | {needs} | {writes} | {task.batch_size} |")
    return "\n".join(lines)


def params_table() -> str:
    """Every param with the tasks that read it and each task's default (one column per task)."""
    names = list(TASKS)
    lines = ["| param | meaning | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for field_name, info in Params.model_fields.items():
        cells = []
        for task in TASKS.values():
            if field_name not in task.params:
                cells.append("")
            elif field_name in ("height", "width") and task.defaults[field_name] is None:
                cells.append("preset")
            else:
                cells.append(_value(task.defaults[field_name]))
        lines.append(f"| `{field_name}` | {info.description} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def presets_table() -> str:
    lines = ["| preset | family | input resize area (VAE / ViT) | default t2i/t2v size (h × w) |",
             "|---|---|---|---|"]
    for p in PRESETS.values():
        h, w = p.output_size
        lines.append(f"| `{p.name}` | {p.family} | {p.vae_res}² / {p.vit_res}² | {h} × {w} |")
    return "\n".join(lines)


TABLES = {"tasks": tasks_table, "params": params_table, "presets": presets_table}


def render_readme(text: str) -> str:
    """`text` (specs/README.md) with every generated block replaced by its current table."""
    def fill(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise KeyError(f"unknown generated block {name!r} (known: {', '.join(TABLES)})")
        return f"{match.group(1)}{TABLES[name]()}\n{match.group(3)}"

    return _BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    schema_path, readme_path = SPECS_DIR / "job.schema.json", SPECS_DIR / "README.md"
    if args == ["--print"]:
        sys.stdout.write(schema_text())
        return 0
    if args not in (["--write"], ["--check"]):
        print("usage: python -m lance_ray.spec.schema --write | --check | --print", file=sys.stderr)
        return 2
    readme = readme_path.read_text(encoding="utf-8")
    wanted = {schema_path: schema_text(), readme_path: render_readme(readme)}
    stale = [path for path, text in wanted.items() if path.read_text(encoding="utf-8") != text]
    if args == ["--check"]:
        for path in stale:
            print(f"{path} is stale: run python -m lance_ray.spec.schema --write", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path], encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
