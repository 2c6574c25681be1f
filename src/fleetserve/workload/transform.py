"""Reshape a trace: cut a time window, sample, scale the arrival rate or the lengths, clip the lengths,
keep the first N.

`apply_transforms` runs them in a fixed order, so a command line means one thing: window (in the
original trace's seconds, re-based to start at 0), then sample, then rate scaling, then length scaling,
then clipping, then the limit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fleetserve.errors import InputError
from fleetserve.workload.trace import TraceRequest


@dataclass(frozen=True, slots=True)
class TransformSpec:
    start_s: float | None = None
    end_s: float | None = None
    sample: float | None = None
    sample_seed: int = 0
    rate_scale: float = 1.0
    length_scale: float = 1.0
    max_input: int | None = None
    max_output: int | None = None
    limit: int | None = None


def apply_transforms(requests: Sequence[TraceRequest], spec: TransformSpec) -> list[TraceRequest]:
    result = list(requests)
    if spec.start_s is not None or spec.end_s is not None:
        result = time_window(result, spec.start_s, spec.end_s)
    if spec.sample is not None:
        result = sample(result, spec.sample, seed=spec.sample_seed)
    if spec.rate_scale != 1.0:
        result = scale_rate(result, spec.rate_scale)
    if spec.length_scale != 1.0:
        result = scale_lengths(result, spec.length_scale)
    if spec.max_input is not None or spec.max_output is not None:
        result = clip_lengths(result, spec.max_input, spec.max_output)
    if spec.limit is not None:
        result = limit(result, spec.limit)
    return result


def time_window(
    requests: Sequence[TraceRequest], start_s: float | None = None, end_s: float | None = None
) -> list[TraceRequest]:
    """Requests with start_s <= timestamp < end_s (seconds), timestamps re-based so start_s becomes 0."""
    start_ms = 0.0 if start_s is None else start_s * 1000.0
    end_ms = float("inf") if end_s is None else end_s * 1000.0
    if end_ms <= start_ms:
        raise InputError(f"empty time window: end {end_s} s is not after start {start_s} s")
    return [
        dataclasses.replace(request, timestamp_ms=request.timestamp_ms - start_ms)
        for request in requests
        if start_ms <= request.timestamp_ms < end_ms
    ]


def sample(requests: Sequence[TraceRequest], fraction: float, *, seed: int = 0) -> list[TraceRequest]:
    """Keep about `fraction` of the requests, the same ones for the same trace and seed. Sessions are kept
    or dropped whole, so a kept conversation keeps all its turns and its shared prefix."""
    if not 0 <= fraction <= 1:
        raise InputError(f"sample fraction must be within [0, 1], got {fraction}")
    # A unit is a session, or a request that belongs to none; each unit gets one draw.
    unit_of_session: dict[str, int] = {}
    units = np.empty(len(requests), dtype=np.int64)
    unit_count = 0
    for position, request in enumerate(requests):
        if request.session is not None and request.session in unit_of_session:
            units[position] = unit_of_session[request.session]
            continue
        if request.session is not None:
            unit_of_session[request.session] = unit_count
        units[position] = unit_count
        unit_count += 1
    draws = np.random.default_rng(seed).random(unit_count)
    keep = draws[units] < fraction
    return [request for request, kept in zip(requests, keep, strict=True) if kept]


def scale_rate(requests: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """Multiply the arrival rate by `factor` by dividing every timestamp by it."""
    if factor <= 0:
        raise InputError(f"rate scale must be > 0, got {factor}")
    return [dataclasses.replace(request, timestamp_ms=request.timestamp_ms / factor) for request in requests]


def scale_lengths(requests: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """Multiply input and output lengths by `factor` (at least 1 token each). The hash block size scales
    too, so every block id still covers the same share of the prompt and the prefix sharing is unchanged;
    this needs block_size * factor to be a whole number."""
    if factor <= 0:
        raise InputError(f"length scale must be > 0, got {factor}")
    scaled: list[TraceRequest] = []
    for request in requests:
        block_size = request.hash_block_size * factor
        if request.hash_ids is not None and (block_size < 1 or not float(block_size).is_integer()):
            raise InputError(
                f"length scale {factor} turns the {request.hash_block_size}-token hash blocks into "
                f"{block_size}-token blocks; pick a factor that keeps them whole"
            )
        scaled.append(
            dataclasses.replace(
                request,
                input_length=max(1, round(request.input_length * factor)),
                output_length=max(1, round(request.output_length * factor)),
                hash_block_size=int(block_size) if request.hash_ids is not None else request.hash_block_size,
            )
        )
    return scaled


def clip_lengths(
    requests: Sequence[TraceRequest], max_input: int | None, max_output: int | None
) -> list[TraceRequest]:
    """Cut prompts to `max_input` tokens and answers to `max_output` (so a trace fits a model's context).
    A clipped prompt keeps the hash blocks that still fit in it whole, so it keeps its shared prefix."""
    for name, value in (("max input", max_input), ("max output", max_output)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    clipped: list[TraceRequest] = []
    for request in requests:
        input_length = request.input_length if max_input is None else min(request.input_length, max_input)
        output_length = (
            request.output_length if max_output is None else min(request.output_length, max_output)
        )
        hash_ids = request.hash_ids
        if hash_ids is not None and input_length < request.input_length:
            hash_ids = hash_ids[: -(-input_length // request.hash_block_size)]
        clipped.append(
            dataclasses.replace(
                request, input_length=input_length, output_length=output_length, hash_ids=hash_ids
            )
        )
    return clipped


def limit(requests: Sequence[TraceRequest], count: int) -> list[TraceRequest]:
    """The first `count` requests."""
    if count < 0:
        raise InputError(f"limit must be >= 0, got {count}")
    return list(requests[:count])
