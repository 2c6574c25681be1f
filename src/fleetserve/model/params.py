"""The cost model's free parameters and the shipped calibration that sets them.

Nothing here depends on a GPU: every parameter says how kernels reach a data-sheet number (a fraction of
peak, a launch floor, cycles per element), so that the same values predict GPUs never measured from
their catalog entries alone. scripts/calibrate_cost_model.py fits them and writes data/calibration.yaml.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import yaml

from fleetserve.errors import InputError


@dataclass(frozen=True)
class CostParams:
    """Defaults are round guesses; the shipped calibration replaces them (see `CostParams.load`).

    Fitted on Vidur's per-operator profiles (A100 and A40): the gemm_*, elementwise_* and *_cycles_*
    parameters. Fitted on Vidur's collective profiles: interconnect_efficiency, collective_latency_s.
    Fitted on end-to-end prefill and decode times (A100), with the rest fixed: attention_*, the two
    overheads and collective_step_latency_s."""

    # matrix multiplications (QKV, attention output, MLP up and down, LM head)
    gemm_memory_efficiency: float = 0.8  # achieved fraction of HBM bandwidth when weight reads bound
    gemm_compute_efficiency: float = 0.75  # achieved fraction of tensor peak in a full wave of tiles
    gemm_small_tile_penalty: float = 1.03  # cost factor per halving of the output tile (less reuse)
    gemm_floor_s: float = 3e-6  # launch and tail of one kernel, paid however small the problem
    # p of the smooth roofline (memory^p + compute^p)^(1/p): large is a sharp max, 1 is a sum
    gemm_roofline_sharpness: float = 3.0
    # memory-bound operators: layer norms, rotary embedding, activation, residual add, embedding lookup
    elementwise_memory_efficiency: float = 0.8
    elementwise_floor_s: float = 2e-6
    # issue cost on top of the bytes, in SM cycles per element (reductions, exp, index arithmetic)
    norm_cycles_per_element: float = 0.5
    rope_cycles_per_element: float = 0.5
    activation_cycles_per_element: float = 0.5
    residual_cycles_per_element: float = 0.1
    embedding_cycles_per_element: float = 1.0
    # tensor-parallel all-reduce: achieved fraction of one-direction link bandwidth, latency per collective
    interconnect_efficiency: float = 0.5
    collective_latency_s: float = 10e-6
    # latency per ring step, fitted end to end: Vidur's loop of one collective shows no growth with tp,
    # but in a forward pass the ranks arrive skewed and each of the 2(tp-1) steps waits for the slowest
    collective_step_latency_s: float = 0.0
    # attention, which the operator profiles do not cover: prefill FLOPs and decode KV reads
    attention_compute_efficiency: float = 0.5
    attention_memory_efficiency: float = 0.8
    # host-side work: per layer per iteration, and per sequence (block tables, sampling, detokenisation)
    layer_overhead_s: float = 2e-5
    sequence_overhead_s: float = 1e-4
    # no measurements cover adapter loads: assumed achievable share of the PCIe link
    host_link_efficiency: float = 0.8

    @classmethod
    def load(cls, path: str | Path | None = None) -> CostParams:
        """Parameters from a calibration file (default: the one shipped in the package)."""
        if path is None:
            text = resources.files("fleetserve").joinpath("data", "calibration.yaml").read_text()
        else:
            text = Path(path).read_text()
        document = yaml.safe_load(text) or {}
        values = document.get("params", {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise InputError(f"unknown cost parameter(s): {', '.join(sorted(unknown))}")
        return cls(**{name: float(value) for name, value in values.items()})


@cache
def default_cost_params() -> CostParams:
    """The shipped calibration, read once per process."""
    return CostParams.load()
