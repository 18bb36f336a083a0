"""Benchmark suites as inputs: `input: {suite: geneval | dpg | vbench | gedit, path: ...}`.

A suite knows which task it evaluates, where its files keep the prompt (and, for GEdit, the input
image), which field numbers its cases, and how many samples per prompt its evaluator expects. The
files it reads are the prompt files the Lance repository ships for these benchmarks
(github.com/bytedance/Lance, `benchmarks/`): JSONL lines `{index, data, additional_info?}`, and for
GEdit a JSON object of records keyed by case id with `interleave_array: [instruction, input image,
target image]`; GenEval's own `evaluation_metadata.jsonl` and VBench's `VBench_full_info.json` are read
too (their prompt field is the fallback column; a case without an index is numbered by position,
which is what those benchmarks' layouts use).

A suite step's row ids are `<case index>-<sample>` (`00012` / `3` → `00012-3`), so the export
(`lance_ray.pipeline.export`, `lance-ray export`) can lay each sample out where the suite's evaluator
looks for it. Explicit `columns` override a suite's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Suite:
    name: str
    task: str  # the task the benchmark evaluates
    prompt: tuple[str, ...]  # column paths tried in order for the prompt / edit instruction
    samples_per_prompt: int  # what the evaluator expects per case
    index: tuple[str, ...] = ("index",)  # column paths numbering the cases (else a JSON key, else the position)
    image: tuple[str, ...] = ()  # column paths of the input image (edits)
    title: str = ""
    layout: str = ""  # what `lance-ray export` writes (docs)
    evaluator: str = ""  # where the layout comes from


SUITES = MappingProxyType({s.name: s for s in (
    Suite("geneval", "t2i", prompt=("data", "prompt"), samples_per_prompt=4,
          title="GenEval (object-focused text-to-image alignment)",
          layout="<dir>/<index:05d>/metadata.jsonl (the case's metadata) and <dir>/<index:05d>/samples/<n:04d>.png",
          evaluator="https://github.com/djghosh13/geneval (README 'Image generation', evaluation/evaluate_images.py)"),
    Suite("dpg", "t2i", prompt=("data", "prompt", "text"), samples_per_prompt=4,
          title="DPG-Bench (dense prompt following)",
          layout="<dir>/<index>.png: the samples tiled 2 per row (up to 4), each tile <side> pixels; evaluate with "
                 "--pic-num <samples> --resolution <side>",
          evaluator="https://github.com/TencentQQGYLab/ELLA (dpg_bench/compute_dpg_bench.py)"),
    Suite("vbench", "t2v", prompt=("data", "prompt_en", "prompt"), samples_per_prompt=5,
          title="VBench (video generation)",
          layout="<dir>/<prompt>-<n>.mp4, named by the benchmark's own prompt (original_prompt_en / prompt_en)",
          evaluator="https://github.com/Vchitect/VBench (prompts/README.md, 'How to Sample Videos for Evaluation')"),
    Suite("gedit", "image_edit", prompt=("interleave_array[0]", "instruction"), samples_per_prompt=1,
          image=("interleave_array[1]", "input_image"),
          title="GEdit-Bench (instruction image editing)",
          layout="<dir>/fullset/<task_type>/<instruction_language>/<key>.png",
          evaluator="https://github.com/stepfun-ai/Step1X-Edit (GEdit-Bench/generate_image_example.py)"),
)})
SUITE_NAMES: tuple[str, ...] = tuple(SUITES)

# Where a suite case keeps the name of its prompt for VBench file names, and its metadata for GenEval.
VBENCH_NAME_COLUMNS = ("original_prompt_en", "prompt_en", "prompt")
