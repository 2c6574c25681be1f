"""Summarise a trace: volume, rate, burstiness, length percentiles, prefix sharing and label counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fleetserve.workload.trace import TraceRequest

PERCENTILES = (50, 90, 99)
LABEL_COUNTS = (
    ("model", "models"),
    ("adapter", "adapters"),
    ("tenant", "tenants"),
    ("session", "sessions"),
    ("category", "categories"),
)


def summarize(requests: Sequence[TraceRequest]) -> dict[str, Any]:
    """A JSON-ready summary of `requests` (taken in timestamp order)."""
    ordered = sorted(requests, key=lambda request: request.timestamp_ms)
    count = len(ordered)
    timestamps = np.fromiter((r.timestamp_ms for r in ordered), np.float64, count)
    inputs = np.fromiter((r.input_length for r in ordered), np.int64, count)
    outputs = np.fromiter((r.output_length for r in ordered), np.int64, count)
    duration_s = float(timestamps[-1] - timestamps[0]) / 1000.0 if count else 0.0
    gaps = np.diff(timestamps)
    summary: dict[str, Any] = {
        "requests": count,
        "duration_s": duration_s,
        # n requests over a span have n-1 gaps between them.
        "mean_rate_rps": (count - 1) / duration_s if duration_s > 0 else None,
        # Squared coefficient of variation of the gaps: 1 for Poisson arrivals, above 1 for bursty ones.
        "interarrival_cv2": float(gaps.var() / gaps.mean() ** 2)
        if len(gaps) > 1 and gaps.mean() > 0
        else None,
        "input_length": _distribution(inputs),
        "output_length": _distribution(outputs),
        "input_tokens": int(inputs.sum()),
        "output_tokens": int(outputs.sum()),
    }
    summary.update(prefix_sharing(ordered))
    for label, key in LABEL_COUNTS:
        summary[key] = len({value for r in ordered if (value := getattr(r, label)) is not None})
    return summary


def prefix_sharing(requests: Sequence[TraceRequest]) -> dict[str, Any]:
    """The share of hash blocks that repeat a block an earlier request already had, i.e. the best prefix
    cache hit rate (in blocks) an unbounded cache could reach on this trace."""
    seen: set[int] = set()
    total = 0
    with_hashes = 0
    for request in requests:
        if request.hash_ids is None:
            continue
        with_hashes += 1
        total += len(request.hash_ids)
        seen.update(request.hash_ids)
    return {
        "requests_with_hash_ids": with_hashes,
        "hash_blocks": total,
        "unique_hash_blocks": len(seen),
        "prefix_sharing_ratio": (total - len(seen)) / total if total else None,
    }


def _distribution(values: np.ndarray) -> dict[str, float | int | None]:
    if len(values) == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "max": None}
    percentiles = np.percentile(values, PERCENTILES)
    return {
        "mean": float(values.mean()),
        **{f"p{p}": float(value) for p, value in zip(PERCENTILES, percentiles, strict=True)},
        "max": int(values.max()),
    }
