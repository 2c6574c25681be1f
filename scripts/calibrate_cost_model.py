"""Fit the cost model's GPU-independent parameters, in three steps, and write data/calibration.yaml.

    python scripts/calibrate_cost_model.py [--output src/fleetserve/data/calibration.yaml]

1. Operators, on Vidur's per-operator profiles (data/perf/vidur/compute, microsoft/vidur, MIT): the GEMM
   and elementwise parameters of model/operators.py, on the A100 and A40 rows together, so what the fit
   learns is how kernels reach a GPU's data-sheet numbers, not the numbers themselves.
2. Collectives, on Vidur's all-reduce profiles of an 8-GPU A100 NVSwitch node (data/perf/vidur/network):
   interconnect efficiency and per-step latency of the ring all-reduce.
3. End to end, on measured prefill and decode times of whole models on A100s (data/perf/
   measured_a100_80gb.csv, Mutinifni/splitwise-sim, MIT), with steps 1 and 2 fixed: attention's two
   efficiencies (the operator profiles do not cover attention) and the host-side overheads.

Each fit minimises a robust (soft-L1) loss of log(predicted / measured), so every point weighs by its
relative error whatever its magnitude. Deterministic: the same data gives the same parameters. The
functions are reused by benchmarks/model_fidelity.py for its leave-one-out runs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import least_squares

from fleetserve.model.catalog import Catalog, GpuSpec, ModelSpec, default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.model.operators import (
    ELEMENTWISE_OPERATORS,
    GEMM_OPERATORS,
    LayerShapes,
    all_reduce_time,
    embedding_time,
    layer_operator_times,
)
from fleetserve.model.params import CostParams

REPO = Path(__file__).resolve().parent.parent
VIDUR = REPO / "data" / "perf" / "vidur"
END_TO_END_CSV = REPO / "data" / "perf" / "measured_a100_80gb.csv"
DEFAULT_OUTPUT = REPO / "src" / "fleetserve" / "data" / "calibration.yaml"
# the profiles' GPU folders, as catalog entries (the A100 profiles are of an 80 GB A100)
PROFILED_GPUS = {"a100": "a100-80g", "a40": "a40"}

GEMM_PARAMS = (
    "gemm_memory_efficiency",
    "gemm_compute_efficiency",
    "gemm_small_tile_penalty",
    "gemm_floor_s",
    "gemm_roofline_sharpness",
)
GEMM_BOUNDS = ((0.05, 0.05, 1.0, 1e-7, 1.0), (1.0, 1.0, 2.0, 1e-4, 20.0))
ELEMENTWISE_PARAMS = (
    "elementwise_memory_efficiency",
    "elementwise_floor_s",
    "norm_cycles_per_element",
    "rope_cycles_per_element",
    "activation_cycles_per_element",
    "residual_cycles_per_element",
    "embedding_cycles_per_element",
)
ELEMENTWISE_BOUNDS = ((0.05, 1e-7, *[1e-3] * 5), (1.0, 1e-4, *[100.0] * 5))
NETWORK_PARAMS = ("interconnect_efficiency", "collective_latency_s")
NETWORK_BOUNDS = ((0.01, 1e-7), (1.0, 1e-3))
END_TO_END_PARAMS = (
    "attention_compute_efficiency",
    "attention_memory_efficiency",
    "layer_overhead_s",
    "sequence_overhead_s",
    "collective_step_latency_s",
)
# attention efficiencies are capped at 0.9: no kernel sustains more of a data-sheet peak
END_TO_END_BOUNDS = ((0.05, 0.05, 1e-8, 1e-7, 1e-7), (0.9, 0.9, 1e-3, 1e-2, 1e-3))
# the embedding lookup, profiled with the layer's operators, runs once per iteration rather than per layer
EMBEDDING = "emb"
PROFILED_ELEMENTWISE = (*ELEMENTWISE_OPERATORS, EMBEDDING)
OPERATOR_CLASSES = {
    **{op: "gemm" for op in GEMM_OPERATORS},
    **{op: "elementwise" for op in PROFILED_ELEMENTWISE},
}


@dataclass
class ProfileSet:
    """Vidur's operator medians for one (GPU, model, TP): `times[op][i]` ms at `tokens[i]` tokens."""

    gpu: GpuSpec
    model: ModelSpec
    tp: int
    tokens: np.ndarray
    times: dict[str, np.ndarray]

    @property
    def label(self) -> str:
        return f"{self.model.name} tp{self.tp} on {self.gpu.name}"


@dataclass(frozen=True)
class EndToEndPoint:
    """One measured whole-model configuration: medians over its runs."""

    model: str
    gpu: str
    tp: int
    prompt_size: int
    batch_size: int
    token_size: int
    prefill_ms: float
    decode_ms: float

    @property
    def decode_context(self) -> int:
        # token_time averages the decode iterations of the whole generation: mid-generation context
        return self.prompt_size + self.token_size // 2


def load_profiles(root: Path = VIDUR, catalog: Catalog | None = None) -> list[ProfileSet]:
    """Every mlp.csv under root/compute/GPU/ORG/MODEL, checked against the catalog's shapes."""
    catalog = catalog or default_catalog()
    sets = []
    for path in sorted((root / "compute").glob("*/*/*/mlp.csv")):
        gpu_dir, org, name = path.parts[-4:-1]
        gpu = catalog.gpu(PROFILED_GPUS[gpu_dir])
        model = catalog.model(f"{org}/{name}")
        rows: dict[tuple[int, int], list[dict[str, str]]] = defaultdict(list)
        with path.open(newline="") as file:
            for row in csv.DictReader(file):
                _check_shapes(row, model, path)
                rows[int(row["num_tensor_parallel_workers"]), int(row["num_tokens"])].append(row)
        for tp in sorted({tp for tp, _ in rows}):
            tokens = sorted(t for degree, t in rows if degree == tp)
            times = {}
            for op in (*GEMM_OPERATORS, *PROFILED_ELEMENTWISE):
                column = f"time_stats.{op}.median"
                if column in rows[tp, tokens[0]][0]:
                    times[op] = np.array(
                        [statistics.median(float(r[column]) for r in rows[tp, t]) for t in tokens]
                    )
            sets.append(ProfileSet(gpu, model, tp, np.array(tokens, dtype=float), times))
    return sets


def _check_shapes(row: dict[str, str], model: ModelSpec, path: Path) -> None:
    profiled = (int(row["n_head"]), int(row["n_kv_head"]), int(row["n_embd"]), int(row["n_expanded_embd"]))
    expected = (model.heads, model.kv_heads, model.hidden_size, model.intermediate_size)
    if profiled != expected or (row["use_gated_mlp"] == "True") != model.gated_mlp:
        raise SystemExit(
            f"{path}: profiled shapes {profiled} differ from the catalog's {model.name} {expected}"
        )


def predicted_operators(profile: ProfileSet, params: CostParams) -> dict[str, np.ndarray]:
    """The model's ms for every profiled operator of `profile`, at its token counts."""
    shapes = LayerShapes.of(profile.model, profile.tp)
    times = layer_operator_times(shapes, profile.tokens, profile.gpu, params)
    times[EMBEDDING] = embedding_time(shapes, profile.tokens, profile.gpu, params)
    return {op: np.asarray(times[op]) * 1e3 for op in profile.times}


def with_values(base: CostParams, names: Sequence[str], values: Iterable[float]) -> CostParams:
    return dataclasses.replace(base, **dict(zip(names, (float(v) for v in values), strict=True)))


def _fit(
    residuals: Callable[[CostParams], np.ndarray],
    base: CostParams,
    names: Sequence[str],
    bounds: tuple[Sequence[float], Sequence[float]],
    f_scale: float = 0.05,
) -> CostParams:
    """Fit `names` in log space (so they stay positive) from a few starts; keep the best."""
    lower, upper = np.log(bounds[0]), np.log(bounds[1])
    start = np.log(np.maximum([getattr(base, name) for name in names], bounds[0]))
    best = None
    for shift in (0.0, -0.7, 0.7):
        x0 = np.clip(start + shift, lower + 1e-9, upper - 1e-9)
        result = least_squares(
            lambda x: residuals(with_values(base, names, np.exp(x))),
            x0,
            bounds=(lower, upper),
            loss="soft_l1",
            f_scale=f_scale,
        )
        if best is None or result.cost < best.cost:
            best = result
    assert best is not None
    return with_values(base, names, np.exp(best.x))


def fit_operators(profiles: Sequence[ProfileSet], base: CostParams) -> CostParams:
    def residuals_of(ops: tuple[str, ...]) -> Callable[[CostParams], np.ndarray]:
        def residuals(params: CostParams) -> np.ndarray:
            parts = []
            for profile in profiles:
                predicted = predicted_operators(profile, params)
                for op in ops:
                    if op in profile.times:
                        parts.append(np.log(predicted[op] / profile.times[op]))
            return np.concatenate(parts)

        return residuals

    params = _fit(residuals_of(GEMM_OPERATORS), base, GEMM_PARAMS, GEMM_BOUNDS)
    return _fit(residuals_of(PROFILED_ELEMENTWISE), params, ELEMENTWISE_PARAMS, ELEMENTWISE_BOUNDS)


@dataclass
class CollectiveProfile:
    gpu: GpuSpec
    tp: int
    sizes: np.ndarray  # bytes
    times: np.ndarray  # ms


def load_all_reduces(root: Path = VIDUR, catalog: Catalog | None = None) -> list[CollectiveProfile]:
    """All-reduce medians within one 8-GPU A100 NVSwitch node (the topology of the catalog's SXM A100)."""
    catalog = catalog or default_catalog()
    by_tp: dict[int, list[tuple[float, float]]] = defaultdict(list)
    with (root / "network" / "a100_dgx" / "all_reduce.csv").open(newline="") as file:
        for row in csv.DictReader(file):
            if row["num_workers"] == row["devices_per_node"]:
                by_tp[int(row["num_workers"])].append(
                    (float(row["size"]), float(row["time_stats.all_reduce.median"]))
                )
    gpu = catalog.gpu("a100-80g")
    return [
        CollectiveProfile(gpu, tp, np.array([s for s, _ in rows]), np.array([t for _, t in rows]))
        for tp, rows in sorted(by_tp.items())
    ]


def predicted_all_reduce(profile: CollectiveProfile, params: CostParams) -> np.ndarray:
    return np.asarray(all_reduce_time(profile.sizes, profile.tp, profile.gpu, params)) * 1e3


def fit_network(profiles: Sequence[CollectiveProfile], base: CostParams) -> CostParams:
    def residuals(params: CostParams) -> np.ndarray:
        return np.concatenate([np.log(predicted_all_reduce(p, params) / p.times) for p in profiles])

    return _fit(residuals, base, NETWORK_PARAMS, NETWORK_BOUNDS)


def load_end_to_end(path: Path = END_TO_END_CSV) -> list[EndToEndPoint]:
    """CSV columns (Mutinifni/splitwise-sim data/perf_model.csv, MIT): model, hardware, tensor_parallel,
    prompt_size, batch_size, token_size, prompt_time (ms to prefill batch_size prompts of prompt_size
    tokens), token_time (ms of one decode iteration of batch_size sequences, averaged over token_size
    output tokens). The five runs of each point are reduced to their median."""
    runs: dict[tuple[str, str, int, int, int, int], list[tuple[float, float]]] = defaultdict(list)
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            key = (
                row["model"],
                row["hardware"],
                int(row["tensor_parallel"]),
                int(row["prompt_size"]),
                int(row["batch_size"]),
                int(row["token_size"]),
            )
            runs[key].append((float(row["prompt_time"]), float(row["token_time"])))
    return [
        EndToEndPoint(*key, statistics.median(p for p, _ in times), statistics.median(d for _, d in times))
        for key, times in sorted(runs.items())
    ]


def predict_end_to_end(point: EndToEndPoint, params: CostParams, catalog: Catalog) -> tuple[float, float]:
    cost = CostModel(catalog.gpu(point.gpu), catalog.model(point.model), point.tp, params)
    prefill = cost.prefill_time(point.prompt_size, point.batch_size)
    decode = cost.decode_step_time(point.decode_context, point.batch_size)
    return prefill * 1e3, decode * 1e3


def fit_end_to_end(points: Sequence[EndToEndPoint], base: CostParams, catalog: Catalog) -> CostParams:
    measured = np.log([[p.prefill_ms, p.decode_ms] for p in points]).ravel()

    def residuals(params: CostParams) -> np.ndarray:
        return np.log([predict_end_to_end(p, params, catalog) for p in points]).ravel() - measured

    return _fit(residuals, base, END_TO_END_PARAMS, END_TO_END_BOUNDS, f_scale=0.05)


def calibrate(
    profiles: Sequence[ProfileSet],
    all_reduces: Sequence[CollectiveProfile],
    points: Sequence[EndToEndPoint],
    catalog: Catalog,
) -> CostParams:
    params = fit_operators(profiles, CostParams())
    params = fit_network(all_reduces, params)
    return fit_end_to_end(points, params, catalog)


# --- errors, shared with benchmarks/model_fidelity.py -------------------------------------------------


def absolute_percentage_errors(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return np.abs(predicted / measured - 1) * 100


def operator_errors(profiles: Sequence[ProfileSet], params: CostParams) -> dict[str, np.ndarray]:
    """Absolute % errors by operator class, and for one layer's non-attention operators summed."""
    by_class: dict[str, list[np.ndarray]] = defaultdict(list)
    for profile in profiles:
        predicted = predicted_operators(profile, params)
        for op, measured in profile.times.items():
            by_class[OPERATOR_CLASSES[op]].append(absolute_percentage_errors(predicted[op], measured))
        layer_predicted = sum(t for op, t in predicted.items() if op != EMBEDDING)
        layer_measured = sum(t for op, t in profile.times.items() if op != EMBEDDING)
        by_class["layer"].append(absolute_percentage_errors(layer_predicted, layer_measured))
    return {name: np.concatenate(parts) for name, parts in by_class.items()}


def end_to_end_errors(
    points: Sequence[EndToEndPoint], params: CostParams, catalog: Catalog
) -> dict[str, np.ndarray]:
    prefill, decode = [], []
    for point in points:
        predicted_prefill, predicted_decode = predict_end_to_end(point, params, catalog)
        prefill.append(abs(predicted_prefill / point.prefill_ms - 1) * 100)
        decode.append(abs(predicted_decode / point.decode_ms - 1) * 100)
    return {"prefill": np.array(prefill), "decode": np.array(decode)}


def summary(errors: np.ndarray) -> dict[str, float]:
    return {
        "median_ape_pct": round(float(np.median(errors)), 1),
        "p90_ape_pct": round(float(np.percentile(errors, 90)), 1),
    }


def _print_table(title: str, errors: dict[str, np.ndarray]) -> None:
    print(title)
    for name, values in errors.items():
        figures = summary(values)
        print(
            f"  {name:<14}{len(values):>7} points   median {figures['median_ape_pct']:>5.1f}%"
            f"   p90 {figures['p90_ape_pct']:>5.1f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="calibration YAML to write")
    args = parser.parse_args()

    catalog = default_catalog()
    profiles = load_profiles(catalog=catalog)
    all_reduces = load_all_reduces(catalog=catalog)
    points = load_end_to_end()
    params = calibrate(profiles, all_reduces, points, catalog)

    operators = operator_errors(profiles, params)
    # the profiles time one collective in a loop: the ring-step latency of a forward pass is not in them
    in_a_loop = dataclasses.replace(params, collective_step_latency_s=0.0)
    network = {
        "all_reduce": np.concatenate(
            [absolute_percentage_errors(predicted_all_reduce(p, in_a_loop), p.times) for p in all_reduces]
        )
    }
    end_to_end = end_to_end_errors(points, params, catalog)
    _print_table(
        f"operators: {len(profiles)} profiled (GPU, model, TP) sets from {VIDUR / 'compute'}", operators
    )
    _print_table("all-reduce within an A100 NVSwitch node, TP 2/4/8", network)
    _print_table(f"end to end: {len(points)} measured points from {END_TO_END_CSV.name}", end_to_end)
    print("fitted parameters:")
    for name in (*GEMM_PARAMS, *ELEMENTWISE_PARAMS, *NETWORK_PARAMS, *END_TO_END_PARAMS):
        print(f"  {name} = {getattr(params, name):.4g}")

    vidur_commit = (VIDUR / "COMMIT").read_text().strip()
    document = {
        "sources": {
            "operators": f"microsoft/vidur data/profiling, commit {vidur_commit}, MIT",
            "collectives": "the same, network/a100_dgx/all_reduce.csv",
            "end_to_end": "Mutinifni/splitwise-sim data/perf_model.csv (A100-80GB rows), MIT licence",
        },
        "command": "python scripts/calibrate_cost_model.py",
        "points": {
            "operator_sets": len(profiles),
            "all_reduce": int(sum(len(p.sizes) for p in all_reduces)),
            "end_to_end": len(points),
        },
        "fit_error": {
            **{f"operator_{name}": summary(values) for name, values in operators.items()},
            **{name: summary(values) for name, values in network.items()},
            **{name: summary(values) for name, values in end_to_end.items()},
        },
        "params": {f.name: float(f"{getattr(params, f.name):.6g}") for f in dataclasses.fields(params)},
    }
    header = (
        "# Written by scripts/calibrate_cost_model.py; do not edit by hand, rerun the script.\n"
        "# GPU-independent cost-model parameters (model/params.py says which data fits which).\n"
        "# host_link_efficiency is assumed, not fitted: no measurements cover adapter loads.\n"
    )
    args.output.write_text(header + yaml.safe_dump(document, sort_keys=False))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
