"""A clock the scheduler tests set by hand: sleeping advances it instead of waiting."""

from __future__ import annotations

from datetime import datetime, timedelta


class FakeClock:
    def __init__(self, now: datetime):
        self.now_ = now
        self.slept: list[float] = []

    def now(self) -> datetime:
        return self.now_

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now_ += timedelta(seconds=seconds)

    def at(self, moment: datetime) -> FakeClock:
        self.now_ = moment
        return self
