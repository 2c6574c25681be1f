"""Quota arithmetic: per-minute request and token limits over a sliding window, and a cap on requests in
flight. Pure: a ledger (in memory here, in Redis at the gateway) counts, this module decides.

The window is the two-bucket estimate many rate limiters use (Cloudflare's, Redis's own examples): the
count of the current minute plus the previous minute's count weighted by the part of it still inside
the last 60 s. A ledger counts a request before the decision (increment first, then decide, and take the
increment back when refused), so two gateway replicas racing for the last unit both see each other:
near the limit that refuses a little early, and it never admits past it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fleetserve.pipeline.stage import Refuse
from fleetserve.tenants.directory import Limits, Tenant

WINDOW_S = 60.0


def window_of(now: float) -> int:
    """The index of the minute `now` (seconds on the ledger's clock) falls in."""
    return math.floor(now / WINDOW_S)


@dataclass(frozen=True, slots=True)
class Usage:
    """A tenant's counts after a reservation was added: this minute's and the last minute's requests
    and tokens (the reservation included), and requests in flight."""

    window: int
    requests_prev: int
    requests_cur: int
    tokens_prev: int
    tokens_cur: int
    in_flight: int


def _fraction(window: int, now: float) -> float:
    return min(max(now / WINDOW_S - window, 0.0), 1.0)


def _estimate(prev: int, cur: int, fraction: float) -> float:
    return prev * (1.0 - fraction) + cur


def _wait_until_fits(prev: int, before: int, amount: int, limit: int, fraction: float) -> float | None:
    """Seconds until `amount` more fits under `limit` with `before` already counted this minute; None
    when it never will (the request alone is over the limit)."""
    if amount > limit:
        return None
    room_now = limit - amount - before
    if room_now >= 0 and prev > 0:
        needed = 1.0 - room_now / prev  # the previous minute's weight must fall to this fraction
        return max(needed - fraction, 0.0) * WINDOW_S
    # it fits only once this minute is the previous one, and has faded enough
    rest_of_window = (1.0 - fraction) * WINDOW_S
    needed = 1.0 - (limit - amount) / before if before > 0 else 0.0
    return rest_of_window + max(needed, 0.0) * WINDOW_S


def _reset_s(prev: int, cur: int, fraction: float) -> float:
    """Seconds until everything counted has left the window (OpenAI's `x-ratelimit-reset-*`)."""
    if cur > 0:
        return (2.0 - fraction) * WINDOW_S
    return (1.0 - fraction) * WINDOW_S if prev > 0 else 0.0


def format_duration(seconds: float) -> str:
    """A duration as OpenAI writes it in rate-limit headers: `250ms`, `12s`, `1m30s`."""
    if seconds < 1.0:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def rate_limit_headers(limits: Limits, usage: Usage, now: float) -> tuple[tuple[str, str], ...]:
    """The `x-ratelimit-*` headers OpenAI's API sends, for the limits the tenant has."""
    fraction = _fraction(usage.window, now)
    headers: list[tuple[str, str]] = []
    for kind, limit, prev, cur in (
        ("requests", limits.rpm, usage.requests_prev, usage.requests_cur),
        ("tokens", limits.tpm, usage.tokens_prev, usage.tokens_cur),
    ):
        if limit is None:
            continue
        remaining = max(0, math.floor(limit - _estimate(prev, cur, fraction)))
        headers += [
            (f"x-ratelimit-limit-{kind}", str(limit)),
            (f"x-ratelimit-remaining-{kind}", str(remaining)),
            (f"x-ratelimit-reset-{kind}", format_duration(_reset_s(prev, cur, fraction))),
        ]
    return tuple(headers)


def check(tenant: Tenant, usage: Usage, tokens: int, now: float) -> Refuse | None:
    """None when the reservation in `usage` (one request, `tokens` prompt tokens) is within the tenant's
    limits; otherwise the 429 it gets, with Retry-After and the rate-limit headers."""
    limits = tenant.limits
    fraction = _fraction(usage.window, now)
    over: list[tuple[str, float | None]] = []
    if limits.max_in_flight is not None and usage.in_flight > limits.max_in_flight:
        over.append((f"{limits.max_in_flight} requests in flight", 1.0))
    for label, limit, prev, cur, amount in (
        ("requests per minute", limits.rpm, usage.requests_prev, usage.requests_cur, 1),
        ("tokens per minute", limits.tpm, usage.tokens_prev, usage.tokens_cur, tokens),
    ):
        if limit is not None and _estimate(prev, cur, fraction) > limit:
            over.append((f"{limit} {label}", _wait_until_fits(prev, cur - amount, amount, limit, fraction)))
    if not over:
        return None
    headers = rate_limit_headers(limits, usage, now)
    if any(wait is None for _, wait in over):
        return Refuse(
            429,
            f"Request too large for tenant {tenant.name}: {tokens} prompt tokens is more than its limit"
            f" of {limits.tpm} tokens per minute.",
            "quota_too_large",
            headers=headers,
            error_type="tokens",
            code="rate_limit_exceeded",
        )
    what = " and ".join(label for label, _ in over)
    wait = max(wait for _, wait in over if wait is not None)
    return Refuse(
        429,
        f"Rate limit reached for tenant {tenant.name}: limit {what}. Please try again in"
        f" {format_duration(wait)}.",
        "quota",
        retry_after_s=wait,
        headers=headers,
        error_type="requests",
        code="rate_limit_exceeded",
    )
