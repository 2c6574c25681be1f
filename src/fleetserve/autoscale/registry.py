"""Autoscalers by the name a fleet file gives them."""

from __future__ import annotations

from typing import Any

from fleetserve.autoscale.apa import APA
from fleetserve.autoscale.base import Autoscaler
from fleetserve.autoscale.kpa import KPA
from fleetserve.autoscale.planned import PlannedAutoscaler
from fleetserve.errors import InputError

AUTOSCALERS: dict[str, type[Autoscaler]] = {"kpa": KPA, "apa": APA, "planned": PlannedAutoscaler}


def build_autoscaler(policy: str, target: float, **params: Any) -> Autoscaler:
    kind = AUTOSCALERS.get(policy)
    if kind is None:
        raise InputError(f"unknown autoscaler {policy!r}; valid: {', '.join(AUTOSCALERS)}")
    return kind(target, **params)
