"""How many engines each group should have: autoscalers that read a window of a group's metrics and
answer a replica count (`base.py`: the interface; `kpa.py`, `apa.py`: AIBrix's two; `window.py`: the
metric window; `scaler.py`: from a desired count to engines started and drained). Pure: the simulator and
the gateway feed the same objects their own metrics and clocks."""

from fleetserve.autoscale.apa import APA
from fleetserve.autoscale.base import Autoscaler, Decision, GroupStatus
from fleetserve.autoscale.kpa import KPA
from fleetserve.autoscale.registry import AUTOSCALERS, build_autoscaler
from fleetserve.autoscale.scaler import GroupScaler, Replica, ScaleActions
from fleetserve.autoscale.window import MetricWindow

__all__ = [
    "APA",
    "AUTOSCALERS",
    "KPA",
    "Autoscaler",
    "Decision",
    "GroupScaler",
    "GroupStatus",
    "MetricWindow",
    "Replica",
    "ScaleActions",
    "build_autoscaler",
]
