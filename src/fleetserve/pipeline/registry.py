"""Stages by name, built from the fleet file's `pipeline:` list, in the order it gives."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fleetserve.model.catalog import Catalog
from fleetserve.named import build_named
from fleetserve.pipeline.priority import PriorityQueueStage
from fleetserve.pipeline.stage import Stage
from fleetserve.tenants.directory import TenantDirectory
from fleetserve.tenants.vtc import FairQueueStage

STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Make a stage class available to `make_stage` under its `name` (usable as a decorator)."""
    STAGES[cls.name] = cls
    return cls


register_stage(PriorityQueueStage)
register_stage(FairQueueStage)


def make_stage(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    tenants: TenantDirectory | None = None,
    catalog: Catalog | None = None,
) -> Stage:
    """Build stage `name` with `params`; a stage that takes `tenants` or `catalog` gets the fleet's
    (they are not parameters the fleet file may set). Raises UnknownName or BadParameters."""
    provided = {"tenants": tenants, "catalog": catalog}
    return build_named("pipeline stage", STAGES, name, params, plural="stages", provided=provided)


def make_pipeline(
    entries: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    tenants: TenantDirectory | None = None,
    catalog: Catalog | None = None,
) -> list[Stage]:
    """Fresh stage objects for (name, params) entries: every gateway and every simulation gets its own,
    as stages keep state (queues, counters)."""
    return [make_stage(name, params, tenants=tenants, catalog=catalog) for name, params in entries]
