"""Tenants: who is asking (keys), what each may use, its quotas, and fair shares of a saturated fleet
(VTC). Pure like the routing room: the gateway and the simulator both drive these objects."""

from fleetserve.tenants.directory import (
    ANONYMOUS,
    Limits,
    Tenant,
    TenantDirectory,
    jain_index,
    key_digest,
)
from fleetserve.tenants.gate import TenantStage
from fleetserve.tenants.ledger import MemoryLedger
from fleetserve.tenants.quota import Usage, check, rate_limit_headers
from fleetserve.tenants.vtc import FairQueueStage

__all__ = [
    "ANONYMOUS",
    "FairQueueStage",
    "Limits",
    "MemoryLedger",
    "Tenant",
    "TenantDirectory",
    "TenantStage",
    "Usage",
    "check",
    "jain_index",
    "key_digest",
    "rate_limit_headers",
]
