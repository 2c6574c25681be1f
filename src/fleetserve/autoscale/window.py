"""A group's metric over time: samples (time, value) kept for the longest window an autoscaler reads."""

from __future__ import annotations

from collections import deque


class MetricWindow:
    def __init__(self, horizon_s: float) -> None:
        self.horizon_s = horizon_s
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        samples = self._samples
        samples.append((now, value))
        while samples and samples[0][0] < now - self.horizon_s:
            samples.popleft()

    def mean(self, now: float, span_s: float) -> float | None:
        """The mean of the samples taken in (now - span_s, now]; None when there is none."""
        total, count = 0.0, 0
        for when, value in reversed(self._samples):
            if when <= now - span_s:
                break
            total += value
            count += 1
        return total / count if count else None

    def __len__(self) -> int:
        return len(self._samples)
