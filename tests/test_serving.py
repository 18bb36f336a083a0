"""The GPU loop of a Lance actor (pipeline/serving.py) on the real tiny model, on CPU: rows from several
concurrent callers share the decode engine's slots and get the answers they get alone; a bad row fails
alone; a row too long for the current slots waits for a bigger engine; generation calls run in between."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from lance_ray.models.lance import TASKS, LancePipeline
from lance_ray.models.lance.understand import answer_all
from lance_ray.pipeline.serving import GpuLoop


@pytest.fixture(scope="module")
def pipe(tiny_ckpt: Path) -> LancePipeline:
    return LancePipeline.from_pretrained(str(tiny_ckpt), family="image", device="cpu", dtype="float32")


def _request(pipe: LancePipeline, seed: int, max_new_tokens: int, question: str = "What is this?"):
    image = np.random.default_rng(seed).integers(0, 256, (40 + 8 * (seed % 3), 60, 3), dtype=np.uint8)
    settings = TASKS["x2t_image"].settings_for(preset="image_256res")
    return pipe.understanding_request(image, question, kind="image", settings=settings, seed=seed,
                                      max_new_tokens=max_new_tokens)


def _alone(pipe: LancePipeline, request) -> list[int]:
    return answer_all(pipe.new_engine([request], max_slots=1), [request])[0].ids


def test_concurrent_callers_share_slots_and_get_their_own_answers(pipe: LancePipeline) -> None:
    loop = GpuLoop(pipe, max_slots=3)
    batches = [[_request(pipe, 10 * b + i, max_new_tokens=2 + (i + b) % 5) for i in range(4)] for b in range(3)]
    results: dict[int, list] = {}

    def caller(b: int) -> None:
        results[b] = [f.result(timeout=600) for f in loop.answer(batches[b])]

    threads = [threading.Thread(target=caller, args=(b,)) for b in range(3)]
    for thread in threads:
        thread.start()
    # A generation-style call from another thread runs between decode windows and returns its value.
    assert loop.call(lambda: "ran on the GPU thread") == "ran on the GPU thread"
    for thread in threads:
        thread.join()
    for b, batch in enumerate(batches):
        assert results[b] == [_alone(pipe, r) for r in batch]


def test_a_bad_row_fails_alone_and_a_longer_row_gets_a_bigger_engine(pipe: LancePipeline) -> None:
    loop = GpuLoop(pipe, max_slots=2)
    good = _request(pipe, 1, max_new_tokens=3)
    bad = _request(pipe, 2, max_new_tokens=3)
    bad.visuals = [bad.visuals[0][:, :30]]  # not a multiple of 28 px: the ViT input cannot be made
    futures = loop.answer([good, bad])
    assert futures[0].result(timeout=600) == _alone(pipe, good)
    with pytest.raises(ValueError, match="multiples of 28"):
        futures[1].result(timeout=600)
    small_slots = loop._engine.capacity
    longer = _request(pipe, 3, max_new_tokens=small_slots + 5)
    assert loop.answer([longer])[0].result(timeout=600) == _alone(pipe, longer)
    assert loop._engine.capacity > small_slots
