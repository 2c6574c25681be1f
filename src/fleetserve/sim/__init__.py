"""The discrete-event simulator: the fleet's digital twin.

It reads the same fleet file as the gateway and runs the same engine model and the same policy objects on
a virtual clock: `simulate(config, trace, policy, seed) -> SimResult`.
"""

from fleetserve.sim.capacity import CapacityResult, find_capacity
from fleetserve.sim.errors import SimInputError
from fleetserve.sim.result import SimResult
from fleetserve.sim.simulator import SimOptions, Simulator, rate_of, simulate
from fleetserve.sim.sweep import SweepCell, plan_cells, run_sweep

__all__ = [
    "CapacityResult",
    "SimInputError",
    "SimOptions",
    "SimResult",
    "Simulator",
    "SweepCell",
    "find_capacity",
    "plan_cells",
    "rate_of",
    "run_sweep",
    "simulate",
]
