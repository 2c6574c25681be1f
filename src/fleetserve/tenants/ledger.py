"""Counting what tenants use, in this process's memory: the simulator's ledger, the gateway's when no
Redis is configured (limits are then per replica), and its fallback while Redis is unreachable. The
gateway's shared ledger (`fleetserve.gateway.redis_ledger`) keeps the same counts in Redis with the same
operations."""

from __future__ import annotations

from dataclasses import dataclass

from fleetserve.tenants.quota import Usage, window_of


@dataclass(slots=True)
class _Counts:
    window: int = 0
    requests_prev: int = 0
    requests_cur: int = 0
    tokens_prev: int = 0
    tokens_cur: int = 0
    in_flight: int = 0

    def roll(self, window: int) -> None:
        if window == self.window:
            return
        if window == self.window + 1:
            self.requests_prev, self.tokens_prev = self.requests_cur, self.tokens_cur
        else:
            self.requests_prev = self.tokens_prev = 0
        self.requests_cur = self.tokens_cur = 0
        self.window = window


class MemoryLedger:
    def __init__(self) -> None:
        self._counts: dict[str, _Counts] = {}

    def _of(self, tenant: str, now: float) -> _Counts:
        counts = self._counts.get(tenant)
        if counts is None:
            counts = self._counts[tenant] = _Counts(window_of(now))
        counts.roll(window_of(now))
        return counts

    def reserve(self, tenant: str, tokens: int, now: float) -> Usage:
        """Count one more request with `tokens` prompt tokens, in flight; the counts after it."""
        counts = self._of(tenant, now)
        counts.requests_cur += 1
        counts.tokens_cur += tokens
        counts.in_flight += 1
        return Usage(
            counts.window,
            counts.requests_prev,
            counts.requests_cur,
            counts.tokens_prev,
            counts.tokens_cur,
            counts.in_flight,
        )

    def refund(self, tenant: str, usage: Usage, tokens: int) -> None:
        """Take back a reservation that was refused."""
        counts = self._counts[tenant]
        counts.in_flight -= 1
        if counts.window == usage.window:
            counts.requests_cur -= 1
            counts.tokens_cur -= tokens
        elif counts.window == usage.window + 1:
            counts.requests_prev -= 1
            counts.tokens_prev -= tokens

    def charge(self, tenant: str, tokens: int, now: float) -> None:
        """Output tokens the tenant's requests produced."""
        if tokens:
            self._of(tenant, now).tokens_cur += tokens

    def release(self, tenant: str) -> None:
        """A request of the tenant is no longer in flight."""
        counts = self._counts.get(tenant)
        if counts is not None and counts.in_flight > 0:
            counts.in_flight -= 1

    def rate_counts(self, now: float) -> list[tuple[str, int, int, int]]:
        """(tenant, minute, requests, tokens) counted in this minute and the last one: what a shared
        ledger adds to its own counts when it comes back after an outage."""
        window = window_of(now)
        out: list[tuple[str, int, int, int]] = []
        for tenant, counts in self._counts.items():
            counts.roll(window)
            for minute, requests, tokens in (
                (window - 1, counts.requests_prev, counts.tokens_prev),
                (window, counts.requests_cur, counts.tokens_cur),
            ):
                if requests or tokens:
                    out.append((tenant, minute, requests, tokens))
        return out

    def forget_rates(self) -> None:
        """Drop the per-minute counts (kept: requests in flight, which end here)."""
        for counts in self._counts.values():
            counts.requests_prev = counts.requests_cur = counts.tokens_prev = counts.tokens_cur = 0
