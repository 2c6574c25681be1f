"""The tenant's own checks before any queue: may it use the model, and is it within its quotas. The
gateway runs these steps with its shared (Redis) ledger and awaits each count; the simulator runs them
as the first stage of its pipeline, `TenantStage`, with a ledger in memory. The decisions are the same
functions (`TenantDirectory.authorise`, `quota.check`) under both clocks."""

from __future__ import annotations

from fleetserve.pipeline.stage import PROCEED, Outcome, Stage, Verdict
from fleetserve.routing.base import FleetView, RequestInfo
from fleetserve.tenants.directory import TenantDirectory
from fleetserve.tenants.ledger import MemoryLedger
from fleetserve.tenants.quota import check


class TenantStage(Stage):
    """Authorisation and quotas as a pipeline stage over a ledger in memory (the simulator's; in the
    gateway the same checks run against the shared ledger before the pipeline)."""

    name = "tenants"

    def __init__(self, *, tenants: TenantDirectory, ledger: MemoryLedger | None = None) -> None:
        self.tenants = tenants
        self.ledger = ledger or MemoryLedger()
        self._counted: set[str] = set()  # requests holding a place in their tenant's in-flight count

    def admit(self, request: RequestInfo, view: FleetView, now: float) -> Verdict:
        tenant = self.tenants.get(request.tenant)
        refusal = self.tenants.authorise(tenant, request.adapter or request.model)
        if refusal is not None:
            return refusal
        if not tenant.limits.bounded:
            return PROCEED
        tokens = request.prompt_len
        usage = self.ledger.reserve(tenant.name, tokens, now)
        refusal = check(tenant, usage, tokens, now)
        if refusal is not None:
            self.ledger.refund(tenant.name, usage, tokens)
            return refusal
        self._counted.add(request.request_id)
        return PROCEED

    def on_finish(self, request: RequestInfo, outcome: Outcome, now: float) -> None:
        if request.request_id in self._counted:
            self._counted.discard(request.request_id)
            name = self.tenants.get(request.tenant).name
            self.ledger.release(name)
            self.ledger.charge(name, outcome.output_tokens, now)
