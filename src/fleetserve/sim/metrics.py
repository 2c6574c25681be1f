"""Per-request timings and fleet totals, and the summary every `sim` command prints.

Times are simulated seconds; the summary reports milliseconds. Token outputs arrive compacted (a span
of n tokens with the first and last token's time), so inter-token latency is recorded as a weighted
log-histogram: a span gives n-1 gaps of (last-first)/(n-1), and the gap from the previous span's last
token to this span's first is one more. That keeps memory constant however many tokens are simulated.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 90, 99)
# 1.01 ratio between bin edges: percentiles are within 0.5% of the exact value
_ITL_RATIO = 1.01
_ITL_MIN_S = 1e-6
_ITL_LOG_RATIO = math.log(_ITL_RATIO)
_ITL_BINS = int(math.log(1e4 / _ITL_MIN_S) / _ITL_LOG_RATIO) + 1


class ITLHistogram:
    """Weighted inter-token gaps on log-spaced bins, with an exact weighted mean."""

    __slots__ = ("counts", "total_gap", "weight")

    def __init__(self) -> None:
        self.counts = [0] * _ITL_BINS
        self.total_gap = 0.0
        self.weight = 0

    def add(self, gap: float, weight: int = 1) -> None:
        self.total_gap += gap * weight
        self.weight += weight
        index = int(math.log(gap / _ITL_MIN_S) / _ITL_LOG_RATIO) if gap > _ITL_MIN_S else 0
        self.counts[index if index < _ITL_BINS else _ITL_BINS - 1] += weight

    def summary_ms(self) -> dict[str, float | None]:
        if not self.weight:
            return _empty_stats()
        cumulative = np.cumsum(self.counts)
        out: dict[str, float | None] = {}
        for p in PERCENTILES:
            index = int(np.searchsorted(cumulative, self.weight * p / 100.0))
            # the geometric middle of the bin
            out[f"p{p}"] = _ITL_MIN_S * _ITL_RATIO ** (index + 0.5) * 1000.0
        out["mean"] = self.total_gap / self.weight * 1000.0
        return out


def _empty_stats() -> dict[str, float | None]:
    return {**{f"p{p}": None for p in PERCENTILES}, "mean": None}


def latency_stats_ms(seconds: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/mean in milliseconds; None for each when there is no sample."""
    if seconds.size == 0:
        return _empty_stats()
    values = np.percentile(seconds, PERCENTILES) * 1000.0
    out: dict[str, float | None] = {f"p{p}": float(v) for p, v in zip(PERCENTILES, values, strict=True)}
    out["mean"] = float(seconds.mean() * 1000.0)
    return out


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float


# why a simulated request failed, as the summary's `failures` names it, in words for people
FAILURE_REASONS = {
    "engine_rejected": "the engine refused it: its prompt leaves no room in the model's context, or it could"
    " never fit the KV cache",
    "model_not_served": "no engine of the fleet serves the model it names",
    "no_engine": "no engine serves its model and adapter",
    "rejected": "the routing policy shed it",
    "shed": "a queueing stage refused it at once: the fleet was full and its priority sheddable",
    "queue_timeout": "it waited in a queueing stage longer than its limit (max_wait_s, or its tenant's"
    " max_queue_s)",
    "quota": "its tenant was over a quota (rpm, tpm or max_in_flight): 429",
    "quota_too_large": "its prompt alone is more than its tenant's tokens-per-minute limit: 429",
    "forbidden_model": "its tenant may not use the model or adapter it names: 403",
    "engine_stopped": "its engine was stopped (a fleet script's stop, or a drain that timed out)",
    "engine_abort": "the engine aborted it",
    "engine_error": "the engine failed it",
    "unfinished": "it never finished (e.g. it waits for an adapter no engine loads)",
    "not_simulated": "the run stopped early (the SLO target was already out of reach)",
}
# failures that no arrival rate changes: the same requests fail at any load
LOAD_INDEPENDENT_FAILURES = frozenset({"engine_rejected", "model_not_served", "no_engine"})


class RequestMetrics:
    """What happened to each request of a run, indexed by its position in the trace."""

    def __init__(self, num_requests: int) -> None:
        nan = math.nan
        self.arrival = [nan] * num_requests
        self.first_token = [nan] * num_requests
        self.finish = [nan] * num_requests
        self.prompt_tokens = [0] * num_requests
        self.output_tokens = [0] * num_requests
        self.cached_tokens = [0] * num_requests
        self.engine = [-1] * num_requests
        self.failures: Counter[str] = Counter()
        self.failure_reason: dict[int, str] = {}  # trace index -> why it failed
        self.itl = ITLHistogram()

    def fail(self, index: int, reason: str) -> None:
        self.failures[reason] += 1
        self.failure_reason[index] = reason
        self.finish[index] = math.nan

    def arrays(self) -> RequestArrays:
        return RequestArrays(
            arrival=np.asarray(self.arrival, dtype=np.float64),
            first_token=np.asarray(self.first_token, dtype=np.float64),
            finish=np.asarray(self.finish, dtype=np.float64),
            prompt_tokens=np.asarray(self.prompt_tokens, dtype=np.int64),
            output_tokens=np.asarray(self.output_tokens, dtype=np.int64),
            cached_tokens=np.asarray(self.cached_tokens, dtype=np.int64),
            engine=np.asarray(self.engine, dtype=np.int64),
        )


@dataclass(frozen=True)
class RequestArrays:
    arrival: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    cached_tokens: np.ndarray
    engine: np.ndarray

    @property
    def completed(self) -> np.ndarray:
        return ~np.isnan(self.finish)

    def ttft(self) -> np.ndarray:
        done = self.completed
        return self.first_token[done] - self.arrival[done]

    def e2e(self) -> np.ndarray:
        done = self.completed
        return self.finish[done] - self.arrival[done]

    def tpot(self) -> np.ndarray:
        """Per request (finish - first token) / (output tokens - 1); 0 for one-token answers."""
        done = self.completed
        decode_tokens = self.output_tokens[done] - 1
        span = self.finish[done] - self.first_token[done]
        return np.where(decode_tokens > 0, span / np.maximum(decode_tokens, 1), 0.0)

    def slo_met(self, slo: SLO) -> np.ndarray:
        """One flag per request of the run; failed requests never meet the SLO."""
        met = np.zeros(self.finish.shape, dtype=bool)
        done = self.completed
        met[done] = (self.ttft() <= slo.ttft_s) & (self.tpot() <= slo.tpot_s)
        return met
