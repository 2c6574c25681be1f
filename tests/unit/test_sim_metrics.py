import math

import numpy as np
import pytest

from fleetserve.sim.metrics import SLO, ITLHistogram, RequestMetrics, latency_stats_ms


def _metrics(rows):
    """rows: (arrival, first_token, finish, output_tokens); finish None = failed"""
    metrics = RequestMetrics(len(rows))
    for index, (arrival, first, finish, tokens) in enumerate(rows):
        metrics.arrival[index] = arrival
        if finish is None:
            metrics.fail(index, "no_engine")
            continue
        metrics.first_token[index] = first
        metrics.finish[index] = finish
        metrics.output_tokens[index] = tokens
    return metrics


def test_slo_needs_both_ttft_and_tpot():
    metrics = _metrics(
        [
            (0.0, 0.1, 1.0, 10),  # ttft 100 ms, tpot 100 ms: both met at the boundary
            (0.0, 0.5, 0.6, 2),  # ttft 500 ms misses
            (0.0, 0.1, 10.0, 10),  # tpot 1.1 s misses
            (0.0, 0.05, 0.05, 1),  # one token: tpot is 0
            (0.0, None, None, 0),  # failed
        ]
    )
    met = metrics.arrays().slo_met(SLO(ttft_s=0.1, tpot_s=0.1))
    assert met.tolist() == [True, False, False, True, False]
    assert metrics.failures == {"no_engine": 1}


def test_tpot_and_e2e_per_request():
    arrays = _metrics([(1.0, 1.2, 2.2, 11), (2.0, 2.1, 2.1, 1)]).arrays()
    assert arrays.tpot() == pytest.approx([0.1, 0.0])
    assert arrays.e2e() == pytest.approx([1.2, 0.1])
    assert arrays.ttft() == pytest.approx([0.2, 0.1])


def test_latency_stats_are_milliseconds():
    stats = latency_stats_ms(np.array([0.1, 0.2, 0.3]))
    assert stats["p50"] == pytest.approx(200.0)
    assert stats["mean"] == pytest.approx(200.0)
    assert latency_stats_ms(np.array([])) == {"p50": None, "p90": None, "p99": None, "mean": None}


def test_itl_spans_are_weighted():
    itl = ITLHistogram()
    itl.add(0.010, 99)  # a span of 100 tokens 10 ms apart
    itl.add(1.0)  # one long gap
    summary = itl.summary_ms()
    assert summary["p50"] == pytest.approx(10.0, rel=0.01)
    assert summary["p99"] == pytest.approx(10.0, rel=0.01)
    assert summary["mean"] == pytest.approx((0.010 * 99 + 1.0) / 100 * 1000)
    itl.add(1.0, 10)
    assert itl.summary_ms()["p99"] == pytest.approx(1000.0, rel=0.01)


def test_itl_handles_zero_and_huge_gaps():
    itl = ITLHistogram()
    itl.add(0.0)
    itl.add(1e6)
    summary = itl.summary_ms()
    assert summary["p50"] is not None and summary["p50"] < 0.01
    assert math.isfinite(summary["p99"])
