"""The job spec: YAML job files → typed, validated `Job` objects; the task registry; the row contract.

    models.py     Job, Step, InputSpec, OutputSpec, ... (pydantic)
    checks.py     rules relating several fields
    loader.py     load_job / load_job_text: YAML with positions → Job, or `file:line:col` problems
    templates.py  Jinja prompt templates (sandboxed)
    rows.py       the row contract between pipeline stages, and the output schema
    schema.py     the generated JSON Schema and specs/README.md tables

The task registry (`TaskSpec`, `TASKS`) and `Params` are the model's vocabulary and live in
`lance_ray/models/lance/` (tasks.py, params.py); they are re-exported here. Importable without
torch or ray.
"""

from lance_ray.models.lance import PROMPT_COLUMNS, TASKS, Params, TaskSpec, get_task
from lance_ray.spec.loader import JobSpecError, SpecProblem, load_job, load_job_text
from lance_ray.spec.models import (
    DEFAULT_MODEL_SOURCE,
    ColumnMap,
    InputSpec,
    Job,
    ModelRef,
    ModelsSpec,
    OutputSpec,
    RaySpec,
    Resources,
    ScheduleSpec,
    Step,
    is_uri,
)
from lance_ray.spec.templates import compile_prompt_template, prompt_template_columns

__all__ = [
    "DEFAULT_MODEL_SOURCE", "PROMPT_COLUMNS", "TASKS", "ColumnMap", "InputSpec", "Job",
    "JobSpecError", "ModelRef", "ModelsSpec", "OutputSpec", "Params", "RaySpec", "Resources", "ScheduleSpec",
    "SpecProblem", "Step", "TaskSpec", "compile_prompt_template", "get_task", "is_uri", "load_job",
    "load_job_text", "prompt_template_columns",
]
