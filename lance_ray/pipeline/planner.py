"""Steps → waves (dependency order) → checkpoint groups → actors, with an estimated GPU time (and cost).

A wave is a set of steps whose inputs are ready at the same time: steps without `from_step` are
wave 0, a step reading another step's output runs one wave after it. Inside a wave, steps of the same
checkpoint family form one group: one actor pool that loads the checkpoint once per GPU and serves
all of the group's steps. Groups of one wave run side by side when the cluster has GPUs for all of
them, one after another otherwise.

The GPU time of a step is rows x turns x its task's cost per row, which grows with what the row asks
for (denoising steps x output size x frames, or new tokens; `TaskSpec.gpu_seconds_per_row`), on the
GPU type asked for (`GPU_SPEED`: costs were fitted on H100s and H200s, benchmarks/fit_costs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lance_ray.models.lance import GPU_SPEED
from lance_ray.spec import Job, Params, Step

GPU_TYPES = tuple(GPU_SPEED)


@dataclass
class PlannedStep:
    step: Step
    rows: int | None  # None when unknown until an upstream step has run
    batch_size: int

    params: Params  # the step's effective params (task defaults applied)
    rows_estimated: bool = False  # `rows` is an estimate (a large remote table counted from its head)
    gpu_type: str = "h100"

    def timeout_s(self, on_gpu: bool) -> float:
        """Deadline of one model call of this step (see `Resources.timeout_s`): the step's own, else ten
        minutes plus twenty times the call's estimated time (a hundred times on CPU actors, whose speed the
        GPU costs do not describe)."""
        if self.step.resources.timeout_s is not None:
            return self.step.resources.timeout_s
        turns = max(1, len(self.step.turns or []))
        estimate = self.batch_size * turns * self.step.spec.gpu_seconds_per_row(self.params, self.gpu_type)
        return 600 + (20 if on_gpu else 100) * estimate

    @property
    def estimated_gpu_s(self) -> float | None:
        if self.rows is None:
            return None
        turns = max(1, len(self.step.turns or []))
        return self.rows * turns * self.step.spec.gpu_seconds_per_row(self.params, self.gpu_type)


@dataclass
class Group:
    family: str
    steps: list[PlannedStep]
    actors: int
    gpus_per_actor: int

    @property
    def estimated_gpu_s(self) -> float | None:
        times = [s.estimated_gpu_s for s in self.steps]
        return None if any(t is None for t in times) else sum(times)


@dataclass
class Wave:
    index: int
    groups: list[Group] = field(default_factory=list)


@dataclass
class Plan:
    job: Job
    waves: list[Wave]
    cluster_gpus: int
    gpu_type: str = "h100"

    @property
    def groups(self) -> list[Group]:
        return [group for wave in self.waves for group in wave.groups]


def step_levels(job: Job) -> dict[str, int]:
    """Wave index of every step; spec validation has already rejected cycles and unknown names."""
    levels: dict[str, int] = {}

    def level(step: Step) -> int:
        if step.name not in levels:
            upstream = step.input.from_step
            levels[step.name] = 0 if upstream is None else level(job.step(upstream)) + 1
        return levels[step.name]

    for step in job.steps:
        level(step)
    return levels


def make_plan(job: Job, cluster_gpus: int = 0, row_counts: dict[str, int | None] | None = None,
              estimated: frozenset[str] = frozenset(), gpu_type: str = "h100") -> Plan:
    """Builds the plan. `row_counts` maps step name → rows (None = unknown); missing steps count as unknown;
    `estimated` names the steps whose count is an estimate. `gpu_type` (one of GPU_TYPES) is what the GPU
    time is estimated for."""
    if gpu_type not in GPU_SPEED:
        raise ValueError(f"unknown GPU type {gpu_type!r}; costs are known for {', '.join(GPU_TYPES)}")
    row_counts = dict(row_counts or {})
    levels = step_levels(job)
    for step in sorted(job.steps, key=lambda s: levels[s.name]):
        if row_counts.get(step.name) is None and step.input.from_step is not None:
            row_counts[step.name] = row_counts.get(step.input.from_step)  # at most the upstream's rows
    waves = [Wave(index) for index in range(max(levels.values(), default=-1) + 1)]
    for wave in waves:
        by_family: dict[str, list[PlannedStep]] = {}
        for step in job.steps:
            if levels[step.name] != wave.index:
                continue
            rows = row_counts.get(step.name)
            batch = step.resources.batch_size or step.spec.batch_size
            by_family.setdefault(step.family, []).append(
                PlannedStep(step, rows, batch, step.params_for(job), rows_estimated=step.name in estimated,
                            gpu_type=gpu_type))
        for family, planned in by_family.items():
            requested = max((p.step.resources.gpus for p in planned if p.step.resources and p.step.resources.gpus),
                            default=None)
            # cfg_parallel runs a step's unconditional CFG branch on a second GPU of the same actor
            per_actor = (2 if any(p.params.cfg_parallel for p in planned) else 1) if cluster_gpus else 0
            wave.groups.append(Group(family, planned, actors=max(requested // max(per_actor, 1), 1) if requested else 0,
                                     gpus_per_actor=per_actor))
        _assign_actors(wave, cluster_gpus)
        for group in wave.groups:
            group.actors = min(group.actors, _useful_actors(group))
    return Plan(job, waves, cluster_gpus, gpu_type)


def _assign_actors(wave: Wave, cluster_gpus: int) -> None:
    """Gives each group of the wave its actor count: what it asked for, else a fair share of the GPUs."""
    unassigned = [g for g in wave.groups if g.actors == 0]
    if cluster_gpus == 0:
        for group in unassigned:
            group.actors = 1  # CPU-only: one model copy per group is all a CPU box can afford
        return
    asked = sum(g.actors * g.gpus_per_actor for g in wave.groups if g.actors)
    spare = max(cluster_gpus - asked, 0)
    for index, group in enumerate(unassigned):
        share = spare // len(unassigned) + (1 if index < spare % len(unassigned) else 0)
        group.actors = max(share // group.gpus_per_actor, 1)


def _useful_actors(group: Group) -> int:
    """More actors than batches would load a checkpoint that never gets a row."""
    if any(p.rows is None for p in group.steps):
        return group.actors
    return max(1, sum(-(-p.rows // p.batch_size) for p in group.steps))


def runs_side_by_side(wave: Wave, cluster_gpus: int) -> bool:
    """Groups of a wave share the cluster only when each gets its own GPUs."""
    return cluster_gpus > 0 and sum(g.actors * g.gpus_per_actor for g in wave.groups) <= cluster_gpus


def format_plan(plan: Plan, gpu_price: float | None = None) -> str:
    """The plan as `lance-ray plan` prints it; with `gpu_price` (dollars per GPU-hour) the cost as well."""
    job = plan.job
    device = f"{plan.cluster_gpus} GPU(s)" if plan.cluster_gpus else "no GPUs (actors run on CPU)"
    lines = [f"job {job.name}: {len(job.steps)} step(s), {len(plan.waves)} wave(s), cluster: {device}"]
    total = 0.0
    unknown = False
    for wave in plan.waves:
        mode = "side by side" if runs_side_by_side(wave, plan.cluster_gpus) else "one after another"
        lines.append(f"wave {wave.index} ({len(wave.groups)} checkpoint group(s), {mode}):")
        for group in wave.groups:
            model = job.model_for(group.family)
            gpus = f"{group.gpus_per_actor} GPU each" if group.gpus_per_actor else "CPU"
            lines.append(f"  group {group.family}: checkpoint {model.source}"
                         f"{'@' + model.revision if model.revision else ''} [{model.backend}, {model.precision}], "
                         f"{group.actors} actor(s), {gpus}")
            for planned in group.steps:
                rows = "?" if planned.rows is None else f"{'~' if planned.rows_estimated else ''}{planned.rows}"
                estimate = planned.estimated_gpu_s
                est = "?" if estimate is None else _duration(estimate)
                source = f" <- {planned.step.input.from_step}" if planned.step.input.from_step else ""
                lines.append(f"    step {planned.step.name:<24} {planned.step.task:<11} rows {rows:>7}  "
                             f"batch {planned.batch_size:>3}  est. GPU time {est}{source}")
            if group.estimated_gpu_s is None:
                unknown = True
            else:
                total += group.estimated_gpu_s
    suffix = " (+ steps of unknown size)" if unknown else ""
    lines.append(f"estimated GPU time: {_duration(total)}{suffix} on {plan.gpu_type.upper()} GPUs "
                 f"(costs fitted to benchmarks/results/, in lance_ray/models/lance/tasks.py)")
    if gpu_price is not None:
        hours = total / 3600
        lines.append(f"estimated cost: {hours:.2f} GPU-hours x ${gpu_price:g}/GPU-hour = ${hours * gpu_price:,.2f}"
                     f"{suffix}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"
