"""Stages by name, built from the fleet file's `pipeline:` list, in the order it gives."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fleetserve.named import build_named
from fleetserve.pipeline.priority import PriorityQueueStage
from fleetserve.pipeline.stage import Stage

STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Make a stage class available to `make_stage` under its `name` (usable as a decorator)."""
    STAGES[cls.name] = cls
    return cls


register_stage(PriorityQueueStage)


def make_stage(name: str, params: Mapping[str, Any] | None = None) -> Stage:
    """Build stage `name` with `params`; raises UnknownName or BadParameters."""
    return build_named("pipeline stage", STAGES, name, params, plural="stages")


def make_pipeline(entries: Iterable[tuple[str, Mapping[str, Any]]]) -> list[Stage]:
    """Fresh stage objects for (name, params) entries: every gateway and every simulation gets its own,
    as stages keep state (queues, counters)."""
    return [make_stage(name, params) for name, params in entries]
