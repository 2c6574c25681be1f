"""Per-request records -> the summary a benchmark reports.

Definitions follow vLLM's `vllm bench serve` so figures are comparable with it:
- TTFT, E2E: per request; TPOT = (E2E - TTFT) / (output_tokens - 1), only for requests with >= 2 tokens;
  ITL: every gap between consecutive text chunks of every request, pooled.
- Throughputs divide by the run's duration (first send to last completion, the drain included);
  `offered_rps` is the schedule's own rate: requests sent over the span from the first scheduled send to
  the last (what `--rate` or a trace asks for). The two differ whenever requests are still running when
  the last one is sent; `rate_windows` in the JSON says which is which.
- Goodput: completed requests per second that met every SLO given (TTFT <= slo_ttft, TPOT <= slo_tpot).
  A one-token request has no TPOT and meets a TPOT SLO trivially, as in vLLM.
- Percentiles are linear-interpolated (numpy's default).
Failures are counted by kind and excluded from latency statistics, never from `sent`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fleetserve.bench.client import RequestRecord


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def given(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None

    def met_by(self, record: RequestRecord) -> bool:
        if not record.ok or record.ttft is None:
            return False
        if self.ttft_ms is not None and record.ttft * 1000.0 > self.ttft_ms:
            return False
        tpot = record.tpot
        return self.tpot_ms is None or tpot is None or tpot * 1000.0 <= self.tpot_ms


@dataclass(frozen=True, slots=True)
class Distribution:
    """A latency distribution in milliseconds."""

    count: int
    mean: float | None
    median: float | None
    p90: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of_seconds(cls, values: Sequence[float] | np.ndarray) -> Distribution:
        if len(values) == 0:
            return cls(0, None, None, None, None, None)
        ms = np.asarray(values, dtype=float) * 1000.0
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(len(ms), float(ms.mean()), float(p50), float(p90), float(p99), float(ms.max()))


@dataclass(frozen=True, slots=True)
class Summary:
    sent: int
    completed: int
    failed: int
    failures: dict[str, int]
    duration_s: float
    offered_rps: float | None  # sent requests over the first-to-last scheduled send; None for one request
    request_throughput: float  # completed requests per second over duration_s
    output_token_throughput: float  # output tokens of completed requests per second
    total_input_tokens: int
    total_output_tokens: int
    goodput: float | None  # requests per second meeting the SLO; None when no SLO was given
    slo: dict[str, float | None] | None
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution
    send_lag_ms: Distribution  # how late the load generator sent requests against its schedule
    itl_quantiles_ms: list[float]  # the pooled ITLs at 0%, 1%, ..., 100%: enough to draw their CDF

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "rate_windows": RATE_WINDOWS}


RATE_WINDOWS = {
    "offered_rps": "requests sent / (last scheduled send - first scheduled send)",
    "request_throughput": "completed requests / duration_s (first send to last completion, drain included)",
    "goodput": "completed requests within the SLO / duration_s",
    "output_token_throughput": "output tokens of completed requests / duration_s",
}


def summarize(records: Iterable[RequestRecord], duration_s: float, slo: SLO | None = None) -> Summary:
    records = list(records)
    completed = [record for record in records if record.ok]
    failures = Counter(record.failure for record in records if record.failure is not None)
    itls = np.fromiter((itl for record in completed for itl in record.itls), dtype=float)
    tpots = [tpot for record in completed if (tpot := record.tpot) is not None]
    output_tokens = sum(record.output_tokens for record in completed)
    per_second = 1.0 / duration_s if duration_s > 0 else 0.0
    goodput = None
    if slo is not None and slo.given:
        goodput = sum(1 for record in completed if slo.met_by(record)) * per_second
    return Summary(
        sent=len(records),
        completed=len(completed),
        failed=len(records) - len(completed),
        failures=dict(sorted(failures.items())),
        duration_s=duration_s,
        offered_rps=_offered_rate(records),
        request_throughput=len(completed) * per_second,
        output_token_throughput=output_tokens * per_second,
        total_input_tokens=sum(record.input_tokens for record in completed),
        total_output_tokens=output_tokens,
        goodput=goodput,
        slo={"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms} if slo is not None and slo.given else None,
        ttft_ms=Distribution.of_seconds([r.ttft for r in completed if r.ttft is not None]),
        tpot_ms=Distribution.of_seconds(tpots),
        itl_ms=Distribution.of_seconds(itls),
        e2e_ms=Distribution.of_seconds([r.e2e for r in completed if r.e2e is not None]),
        send_lag_ms=Distribution.of_seconds([max(0.0, r.sent_at - r.scheduled_at) for r in records]),
        itl_quantiles_ms=[float(q) for q in np.percentile(itls * 1000.0, np.arange(101))]
        if itls.size
        else [],
    )


def _offered_rate(records: Sequence[RequestRecord]) -> float | None:
    if len(records) < 2:
        return None
    times = [record.scheduled_at for record in records]
    span = max(times) - min(times)
    return (len(records) - 1) / span if span > 0 else None


def record_to_dict(record: RequestRecord) -> dict[str, object]:
    """A request as the JSON report stores it: ITLs are summarised, not listed, to keep reports small."""
    return {
        "index": record.index,
        "ok": record.ok,
        "failure": record.failure,
        "status": record.status,
        "error": record.error,
        "input_tokens": record.input_tokens,
        "requested_output_tokens": record.requested_output_tokens,
        "output_tokens": record.output_tokens,
        "scheduled_at": record.scheduled_at,
        "sent_at": record.sent_at,
        "ttft": record.ttft,
        "tpot": record.tpot,
        "e2e": record.e2e,
        "max_itl": max(record.itls) if record.itls else None,
    }
