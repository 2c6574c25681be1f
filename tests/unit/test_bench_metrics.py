"""Metric definitions of the load generator: TPOT as vLLM defines it, percentiles, goodput, failures."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetserve.bench.client import CONNECT_ERROR, INCOMPLETE_STREAM, STREAM_ERROR, TIMEOUT, RequestRecord
from fleetserve.bench.metrics import SLO, Distribution, record_to_dict, summarize


def completed(ttft: float, e2e: float, tokens: int, itls: list[float] | None = None, index: int = 0):
    return RequestRecord(
        index=index,
        input_tokens=100,
        requested_output_tokens=tokens,
        scheduled_at=0.0,
        ttft=ttft,
        e2e=e2e,
        itls=itls or [],
        output_tokens=tokens,
    )


def failed(kind: str, index: int = 0) -> RequestRecord:
    record = RequestRecord(index=index, input_tokens=100, requested_output_tokens=10, scheduled_at=0.0)
    record.fail(kind, "boom")
    return record


def test_tpot_excludes_the_first_token() -> None:
    # 11 tokens: the first at 0.1 s, ten more by 1.1 s -> 100 ms per token after the first.
    assert completed(ttft=0.1, e2e=1.1, tokens=11).tpot == pytest.approx(0.1)


def test_tpot_is_undefined_for_one_token_and_for_failures() -> None:
    assert completed(ttft=0.1, e2e=0.1, tokens=1).tpot is None
    record = completed(ttft=0.1, e2e=1.1, tokens=11)
    record.fail(INCOMPLETE_STREAM, "cut")
    assert record.tpot is None


def test_percentiles_interpolate_linearly_in_milliseconds() -> None:
    stats = Distribution.of_seconds([value / 1000.0 for value in range(1, 101)])
    assert stats.count == 100
    assert stats.mean == pytest.approx(50.5)
    assert stats.median == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(90.1)
    assert stats.p99 == pytest.approx(99.01)
    assert stats.max == pytest.approx(100.0)


def test_empty_distribution_has_no_figures() -> None:
    assert Distribution.of_seconds([]) == Distribution(0, None, None, None, None, None)


def test_summary_pools_itls_and_computes_throughput() -> None:
    records = [
        completed(0.1, 0.5, 5, itls=[0.1, 0.1, 0.1, 0.1], index=0),
        completed(0.2, 0.4, 3, itls=[0.1, 0.1], index=1),
    ]
    summary = summarize(records, duration_s=2.0)
    assert summary.itl_ms.count == 6
    assert summary.itl_ms.mean == pytest.approx(100.0)
    assert summary.request_throughput == pytest.approx(1.0)
    assert summary.output_token_throughput == pytest.approx(4.0)
    assert summary.total_output_tokens == 8
    assert summary.ttft_ms.mean == pytest.approx(150.0)
    assert summary.tpot_ms.median == pytest.approx(100.0)
    assert summary.goodput is None and summary.slo is None


def test_goodput_counts_requests_meeting_every_slo_per_second() -> None:
    records = [
        completed(0.1, 1.1, 11, index=0),  # TTFT 100 ms, TPOT 100 ms: meets both
        completed(0.3, 1.3, 11, index=1),  # TTFT 300 ms: misses TTFT
        completed(0.1, 2.1, 11, index=2),  # TPOT 200 ms: misses TPOT
        completed(0.1, 0.1, 1, index=3),  # one token: no TPOT, meets it trivially
        failed(TIMEOUT, index=4),  # failures never count
    ]
    summary = summarize(records, duration_s=2.0, slo=SLO(ttft_ms=200, tpot_ms=150))
    assert summary.goodput == pytest.approx(2 / 2.0)
    assert summary.slo == {"ttft_ms": 200, "tpot_ms": 150}


def test_goodput_with_only_a_ttft_slo_ignores_tpot() -> None:
    records = [completed(0.1, 5.1, 11, index=0), completed(0.3, 0.4, 2, index=1)]
    assert summarize(records, 1.0, SLO(ttft_ms=200)).goodput == pytest.approx(1.0)


def test_failures_are_classified_and_never_dropped() -> None:
    records = [
        completed(0.1, 0.2, 2, index=0),
        failed("http_503", 1),
        failed("http_503", 2),
        failed("http_429", 3),
        failed(CONNECT_ERROR, 4),
        failed(STREAM_ERROR, 5),
    ]
    summary = summarize(records, duration_s=1.0)
    assert summary.sent == 6
    assert summary.completed == 1
    assert summary.failed == 5
    assert summary.failures == {"connect_error": 1, "http_429": 1, "http_503": 2, "stream_error": 1}
    # Failed requests do not pollute latency statistics.
    assert summary.ttft_ms.count == 1


@given(st.lists(st.sampled_from([None, "http_503", TIMEOUT, STREAM_ERROR]), max_size=50))
def test_completed_plus_failed_is_sent(kinds: list[str | None]) -> None:
    records = [
        completed(0.1, 0.2, 2, index=i) if kind is None else failed(kind, i) for i, kind in enumerate(kinds)
    ]
    summary = summarize(records, duration_s=1.0)
    assert summary.completed + summary.failed == summary.sent == len(kinds)
    assert sum(summary.failures.values()) == summary.failed


def test_report_record_summarises_itls() -> None:
    row = record_to_dict(completed(0.1, 0.5, 5, itls=[0.1, 0.2, 0.05, 0.05]))
    assert row["max_itl"] == pytest.approx(0.2)
    assert row["tpot"] == pytest.approx(0.1)
    assert "itls" not in row


def test_offered_rate_is_the_schedule_and_throughput_includes_the_drain() -> None:
    records = []
    for index in range(11):  # one send every 0.1 s: 10 req/s offered over 1 s
        record = completed(ttft=0.1, e2e=2.0, tokens=5, itls=[0.01, 0.02], index=index)
        record.scheduled_at = 0.1 * index
        records.append(record)
    summary = summarize(records, duration_s=3.0)  # the last answer arrives 2 s after the last send
    assert summary.offered_rps == pytest.approx(10.0)
    assert summary.request_throughput == pytest.approx(11 / 3.0)
    assert summary.to_dict()["rate_windows"]["offered_rps"].startswith("requests sent")
    assert summary.itl_quantiles_ms[0] == pytest.approx(10.0) and summary.itl_quantiles_ms[
        -1
    ] == pytest.approx(20.0)
