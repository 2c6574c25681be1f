"""What the simulator reports of the migrations it ran: how many and why, KV moved, downtimes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetserve.migration import Move


@dataclass
class MigrationLog:
    by_reason: Counter[str] = field(default_factory=Counter)
    kv_bytes: float = 0.0
    recomputed_tokens: int = 0
    downtimes_s: list[float] = field(default_factory=list)
    aborted: int = 0  # moves given up at the last stage (finished meanwhile, or no room at the destination)

    def record(self, move: Move, downtime_s: float) -> None:
        self.by_reason[move.reason] += 1
        if move.copy is None:
            self.recomputed_tokens += move.context_tokens
        else:
            self.kv_bytes += move.copy.kv_bytes
            self.downtimes_s.append(downtime_s)

    def summary(self, policy: str) -> dict[str, Any]:
        downtimes = np.asarray(self.downtimes_s) * 1000.0
        percentiles = (
            {f"p{q}": round(float(np.percentile(downtimes, q)), 3) for q in (50, 90, 99)}
            if downtimes.size
            else {}
        )
        return {
            "migrations": {
                "policy": policy,
                "count": sum(self.by_reason.values()),
                "by_reason": dict(self.by_reason),
                "aborted": self.aborted,
                "recomputed_tokens": self.recomputed_tokens,
            },
            "migrated_kv_gb": round(self.kv_bytes / 1e9, 4),
            "migration_downtime_ms": percentiles,
        }
