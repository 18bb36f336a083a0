"""The GPU loop of a Lance actor: one thread does all of the actor's GPU work, so the GPU never waits on Ray.

Ray Data calls the actor from several threads at once (several batches in flight). Each call hands its
rows here and waits for their futures:
* caption/answer rows become decode requests; the loop keeps a `DecodeEngine`'s slots full with them,
  from whichever call they came, so a slot freed by a short answer is refilled at once and a batch never
  waits for its longest row;
* generation calls run whole, between two decode windows.

The engine is built on the first caption rows, with slots sized to hold them (and the free GPU memory);
a later row too long for its slots waits until the engine has drained, then the engine is rebuilt bigger.
A prefill that runs out of GPU memory is retried with half as many rows; any other prefill error is
retried row by row, so only the bad row fails; an error while decoding fails the rows in flight (out of
memory there also halves the next engine's slots). The loop never dies on a row.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from lance_ray.models.lance import admissible

log = logging.getLogger(__name__)

def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future


class GpuLoop:
    def __init__(self, pipeline: Any, *, max_slots: int = 256) -> None:
        self.pipeline = pipeline
        self.max_slots = max_slots
        self.admit_tokens: int | None = None  # None: the engine's own budget; halved after a prefill runs out of memory
        self._inbox: queue.Queue = queue.Queue()
        self._pending: deque = deque()  # (request, future) waiting for a slot
        self._futures: dict[int, Future] = {}  # id(request) -> its future, while in a slot
        self._engine = None
        self._thread = threading.Thread(target=self._loop, name="lance-gpu", daemon=True)
        self._thread.start()

    # -- called from any thread

    def answer(self, requests: list) -> list[Future]:
        """Futures of the answers (generated ids) to decode `requests` (`understand.Request`)."""
        futures = [Future() for _ in requests]
        self._inbox.put(list(zip(requests, futures, strict=True)))
        return futures

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the GPU thread (between decode windows) and return its result."""
        future: Future = Future()
        self._inbox.put(_Call(fn, future))
        return future.result()

    # -- the GPU thread

    def _loop(self) -> None:
        while True:
            busy = bool(self._pending) or (self._engine is not None and self._engine.active)
            try:
                item = self._inbox.get(block=not busy)
                while True:  # take everything that is waiting, without blocking
                    self._take(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            self._admit()
            self._decode()

    def _take(self, item: Any) -> None:
        if isinstance(item, _Call):
            try:
                item.future.set_result(item.fn())
            except BaseException as exc:  # the caller re-raises it
                item.future.set_exception(exc)
        else:
            self._pending.extend(item)

    def _admit(self) -> None:
        """Fill free slots from the pending rows, at most `admit_tokens` of prompt per prefill."""
        while self._pending:
            engine = self._engine_for(self._pending[0][0])
            if engine is None:
                return  # the next row needs bigger slots: wait for the engine to drain
            budget = min(engine.admit_tokens, self.admit_tokens or engine.admit_tokens)
            n = admissible(engine, [r for r, _ in itertools.islice(self._pending, engine.free)], budget)
            if not n:
                return
            chosen = [self._pending.popleft() for _ in range(n)]
            tokens = sum(r.prompt_len for r, _ in chosen)
            try:
                engine.admit([r for r, _ in chosen])
            except BaseException as exc:
                self._free_memory()
                if _out_of_memory(exc) and len(chosen) > 1:  # retry with fewer rows per prefill
                    self.admit_tokens = max(1, tokens // 2)
                    self._pending.extendleft(reversed(chosen))
                    continue
                if len(chosen) > 1:  # find the bad row: admit the rows one by one
                    for one in chosen:
                        self._admit_alone(engine, *one)
                    continue
                log.warning("prefill failed: %s: %s", type(exc).__name__, exc)
                chosen[0][1].set_exception(exc)
                continue
            for request, future in chosen:
                self._futures[id(request)] = future

    def _admit_alone(self, engine: Any, request: Any, future: Future) -> None:
        try:
            engine.admit([request])
        except BaseException as exc:
            log.warning("prefill failed: %s: %s", type(exc).__name__, exc)
            future.set_exception(exc)
        else:
            self._futures[id(request)] = future

    def _engine_for(self, request: Any):
        """The engine to admit `request` into: the current one if its slots hold it, a new one (built
        on the pending rows) when there is none or the current one is idle and too small; else None."""
        engine = self._engine
        if engine is not None and engine.fits(request):
            return engine if engine.free else None
        if engine is not None and engine.active:
            return None
        self._engine = None  # free the old slots before sizing new ones
        sample = [r for r, _ in list(self._pending)[:self.max_slots]]
        self._engine = self.pipeline.new_engine(sample, max_slots=self.max_slots)
        log.info("decode engine: %d slots of %d tokens", len(self._engine.slots), self._engine.capacity)
        return self._engine

    def _decode(self) -> None:
        engine = self._engine
        if engine is None or not engine.active:
            return
        try:
            answers = engine.run()
        except BaseException as exc:
            in_flight = [s.request for s in engine.slots if s is not None]
            self._recover(exc)
            for request in in_flight:
                self._futures.pop(id(request)).set_exception(exc)
            return
        for answer in answers:
            self._futures.pop(id(answer.request)).set_result(answer.ids)

    def _recover(self, exc: BaseException) -> None:
        """After a failed decode window: drop the engine (its slots are in an unknown state); after an
        out-of-memory error, build the next one with half the slots."""
        log.warning("decode engine failed (%s: %s); rebuilding it", type(exc).__name__, exc)
        if _out_of_memory(exc) and self._engine is not None:
            self.max_slots = max(1, len(self._engine.slots) // 2)
        self._engine = None
        self._free_memory()

    @staticmethod
    def _free_memory() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
