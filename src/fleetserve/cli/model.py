"""`fleetserve model`: ask the engine model how fast a model runs on a GPU, and list the catalogs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import click
from rich.table import Table

from fleetserve.cli.console import make_console
from fleetserve.model.catalog import Catalog, CatalogError, GpuSpec, ModelSpec, UnknownEntry
from fleetserve.model.cost import CostModel, PrefillBreakdown, UnsupportedParallelism

Spec = TypeVar("Spec", GpuSpec, ModelSpec)

CATALOG_OPTION_HELP = (
    "YAML file with extra or overriding `gpus:` / `models:` entries (same fields as the shipped "
    "catalog; see `fleetserve model list`), e.g. to set the price you pay."
)


@click.group(name="model")
def model() -> None:
    """Predict engine timings from the calibrated engine model, and list known GPUs and models.

    Times come from an operator-level model (each GEMM and memory-bound operator of a decoder layer a
    roofline with a fitted efficiency curve, attention, tensor-parallel all-reduces, host overheads)
    fitted on Vidur's public A100 and A40 operator profiles and measured A100 runs; see docs/model.md."""


@dataclass(frozen=True)
class Prediction:
    gpu: GpuSpec
    model: ModelSpec
    tp: int
    batch: int
    prompt: int
    output: int | None
    kv_blocks: int
    block_size: int
    prefill_s: float
    decode_step_s: float
    e2e_s: float | None
    breakdown: PrefillBreakdown | None = None

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_blocks * self.block_size

    @property
    def usd_per_hour(self) -> float:
        return self.gpu.usd_per_hour * self.tp

    @property
    def tokens_per_s(self) -> float | None:
        if self.output is None or self.e2e_s is None:
            return None
        return self.batch * self.output / self.e2e_s

    def as_json(self) -> dict[str, float | int]:
        result: dict[str, float | int] = {
            "prefill_ms": round(self.prefill_s * 1e3, 3),
            "decode_step_ms": round(self.decode_step_s * 1e3, 3),
        }
        if self.e2e_s is not None and self.tokens_per_s is not None:
            result["e2e_ms"] = round(self.e2e_s * 1e3, 3)
            result["tokens_per_s"] = round(self.tokens_per_s, 2)
        result["kv_blocks"] = self.kv_blocks
        result["kv_capacity_tokens"] = self.kv_capacity_tokens
        result["usd_per_hour"] = round(self.usd_per_hour, 4)
        if self.breakdown is not None:
            b = self.breakdown
            result["layer_non_attention_ms"] = round(b.layer_non_attention * 1e3, 4)
            result["layer_attention_ms"] = round(b.attention * 1e3, 4)
            result["layer_all_reduce_ms"] = round(b.all_reduce * 1e3, 4)
            result["layer_operators_ms"] = {op: round(t * 1e3, 4) for op, t in b.operators.items()}
        return result


@model.command()
@click.option(
    "--gpu", required=True, help="GPU type, e.g. h100-80g, a100-80g, l4 (see `fleetserve model list`)."
)
@click.option(
    "--model", "model_name", required=True, help="Model, e.g. llama-3-8b (see `fleetserve model list`)."
)
@click.option(
    "--tp",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Tensor-parallel degree: GPUs of this type that hold one copy of the model together.",
)
@click.option(
    "--prompt",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Prompt length of each request, in tokens.",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Requests processed together: the prefill runs all BATCH prompts in one iteration, and each "
    "decode step produces one token for each of the BATCH requests.",
)
@click.option(
    "--output",
    type=click.IntRange(min=1),
    default=None,
    help="Output tokens per request. Adds end-to-end latency (prefill + OUTPUT-1 decode steps with "
    "growing context) and output throughput in tokens/s summed over the batch.",
)
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Tokens per KV-cache block, as vLLM's --block-size.",
)
@click.option(
    "--gpu-memory-utilization",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.9,
    show_default=True,
    help="Fraction of each GPU's memory for weights plus KV cache, as vLLM's flag of the same name.",
)
@click.option(
    "--catalog",
    "catalog_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=CATALOG_OPTION_HELP,
)
@click.option(
    "--breakdown",
    is_flag=True,
    help="Also show where the prefill's time goes: each operator of one decoder layer (QKV, output and "
    "MLP projections, norms, rotary embedding, activation, residual add) for the PROMPT x BATCH tokens "
    "at this TP, attention and the all-reduces. With --json: layer_non_attention_ms, layer_attention_ms, "
    "layer_all_reduce_ms and layer_operators_ms.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line (times in ms) instead of a table.")
def predict(
    gpu: str,
    model_name: str,
    tp: int,
    prompt: int,
    batch: int,
    output: int | None,
    block_size: int,
    gpu_memory_utilization: float,
    catalog_file: Path | None,
    breakdown: bool,
    as_json: bool,
) -> None:
    """Predict prefill time, decode-step time and (with --output) end-to-end latency of a batch.

    Times are in milliseconds for one engine (TP GPUs). The decode step is the first one after the
    prefill: BATCH sequences with PROMPT+1 tokens of context each. $/hour is the on-demand price of the
    TP GPUs.

    Example: fleetserve model predict --gpu h100-80g --model llama-2-70b --tp 4 --prompt 512 --batch 8
    """
    catalog = _load_catalog(catalog_file)
    gpu_spec = _lookup(catalog.gpu, gpu, "--gpu")
    model_spec = _lookup(catalog.model, model_name, "--model")
    try:
        cost = CostModel(gpu_spec, model_spec, tp)
    except UnsupportedParallelism as error:
        raise click.BadParameter(str(error), param_hint="--tp") from error

    kv_blocks = cost.num_kv_blocks(block_size, gpu_memory_utilization)
    if kv_blocks == 0:
        raise click.ClickException(_does_not_fit(gpu_spec, model_spec, tp, gpu_memory_utilization))
    sequence_len = prompt + (output or 1)
    if sequence_len > model_spec.max_context:
        raise click.ClickException(
            f"prompt + output = {sequence_len} tokens exceeds {model_spec.name}'s context of "
            f"{model_spec.max_context} tokens"
        )
    blocks_needed = batch * -(-sequence_len // block_size)
    if blocks_needed > kv_blocks:
        raise click.ClickException(
            f"a batch of {batch} x {sequence_len} tokens needs {blocks_needed} KV blocks, but "
            f"{model_spec.name} on {tp} x {gpu_spec.name} has {kv_blocks} ({kv_blocks * block_size} tokens); "
            "use a smaller --batch, a higher --tp or a bigger GPU"
        )

    prefill_s = cost.prefill_time(prompt, batch)
    # the prefill emits each sequence's first token; decode step k then runs with PROMPT + k tokens
    decode_step_s = cost.decode_step_time(prompt + 1, batch)
    e2e_s = None
    if output is not None:
        e2e_s = prefill_s + sum(cost.decode_step_time(prompt + step, batch) for step in range(1, output))
    prediction = Prediction(
        gpu_spec,
        model_spec,
        tp,
        batch,
        prompt,
        output,
        kv_blocks,
        block_size,
        prefill_s,
        decode_step_s,
        e2e_s,
        cost.prefill_breakdown(prompt, batch) if breakdown else None,
    )
    if as_json:
        click.echo(json.dumps(prediction.as_json()))
        return
    console = make_console()
    console.print(_prediction_table(prediction))
    if prediction.breakdown is not None:
        console.print(_breakdown_table(prediction))


@model.command(name="list")
@click.option(
    "--catalog",
    "catalog_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=CATALOG_OPTION_HELP,
)
@click.option("--json", "as_json", is_flag=True, help="Print the catalogs as one JSON object.")
def list_catalog(catalog_file: Path | None, as_json: bool) -> None:
    """List the GPUs and models the engine model knows, with the numbers it uses."""
    catalog = _load_catalog(catalog_file)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "gpus": {name: _public_fields(spec) for name, spec in sorted(catalog.gpus.items())},
                    "models": {name: _public_fields(spec) for name, spec in sorted(catalog.models.items())},
                }
            )
        )
        return
    gpus = Table(title="GPUs (per GPU; TFLOP/s dense BF16, bandwidths in GB/s)")
    for column in ("name", "TFLOP/s", "HBM GB/s", "memory GB", "interconnect GB/s", "$/hour"):
        gpus.add_column(column, overflow="fold")
    for spec in sorted(catalog.gpus.values(), key=lambda g: g.name):
        gpus.add_row(
            spec.name,
            f"{spec.bf16_tflops:g}",
            f"{spec.hbm_gbps:g}",
            f"{spec.memory_gb:g}",
            f"{spec.interconnect_gbps:g} ({spec.interconnect})",
            f"{spec.usd_per_hour:.3f}",
        )
    models = Table(title="Models (heads: query/KV; ctx: max context tokens; KV KiB per token, BF16)")
    models.add_column("name", no_wrap=True)
    for column in ("params", "layers", "hidden", "heads", "vocab", "ctx", "KV KiB"):
        models.add_column(column)
    for spec in sorted(catalog.models.values(), key=lambda m: m.name):
        models.add_row(
            spec.name,
            f"{spec.params / 1e9:.3g}B",
            str(spec.layers),
            str(spec.hidden_size),
            f"{spec.heads}/{spec.kv_heads}",
            str(spec.vocab_size),
            str(spec.max_context),
            f"{spec.kv_bytes_per_token / 1024:g}",
        )
    console = make_console()
    console.print(gpus)
    console.print("Price sources (on-demand, per GPU):")
    for spec in sorted(catalog.gpus.values(), key=lambda g: g.name):
        console.print(f"  {spec.name}: {spec.price_source}", highlight=False)
    console.print(models)


def _load_catalog(catalog_file: Path | None) -> Catalog:
    try:
        return Catalog.load(catalog_file)
    except CatalogError as error:
        raise click.BadParameter(str(error), param_hint="--catalog") from error


def _lookup(find: Callable[[str], Spec], name: str, option: str) -> Spec:
    try:
        return find(name)
    except UnknownEntry as error:
        raise click.BadParameter(str(error), param_hint=option) from error


def _does_not_fit(gpu: GpuSpec, model: ModelSpec, tp: int, utilization: float) -> str:
    usable_gb = gpu.memory_gb * utilization
    message = (
        f"{model.name} does not fit: its BF16 weights take {model.weight_bytes / 1e9:.1f} GB, "
        f"{model.weight_bytes / tp / 1e9:.1f} GB per GPU at tp={tp}, but a {gpu.name} offers "
        f"{usable_gb:.1f} GB ({gpu.memory_gb:g} GB x {utilization:g}) for weights and KV cache"
    )
    fitting = [
        degree
        for degree in (2, 4, 8, 16)
        if degree > tp
        and model.heads % degree == 0
        and CostModel(gpu, model, degree).num_kv_blocks(16, utilization) > 0
    ]
    if fitting:
        message += f"; try --tp {fitting[0]}"
    return message


def _prediction_table(p: Prediction) -> Table:
    table = Table(title=f"{p.model.name} on {p.tp} x {p.gpu.name}", show_header=False)
    table.add_column("quantity", style="bold")
    table.add_column("value")
    table.add_row(
        "GPU", f"{p.gpu.name}: {p.gpu.bf16_tflops:g} TFLOP/s, {p.gpu.hbm_gbps:g} GB/s, {p.gpu.memory_gb:g} GB"
    )
    table.add_row(
        "model", f"{p.model.name}: {p.model.params / 1e9:.2f}B params, context {p.model.max_context}"
    )
    table.add_row("tensor parallel", f"{p.tp} GPU(s)")
    table.add_row("KV cache", f"{p.kv_blocks} blocks x {p.block_size} = {p.kv_capacity_tokens} tokens")
    table.add_row(f"prefill ({p.batch} x {p.prompt} tokens)", f"{p.prefill_s * 1e3:.1f} ms")
    table.add_row(f"decode step ({p.batch} sequences)", f"{p.decode_step_s * 1e3:.2f} ms")
    if p.e2e_s is not None and p.tokens_per_s is not None:
        table.add_row(f"end to end ({p.output} output tokens)", f"{p.e2e_s * 1e3:.1f} ms")
        table.add_row("output throughput", f"{p.tokens_per_s:.1f} tokens/s")
        usd_per_million = p.usd_per_hour / 3600 / p.tokens_per_s * 1e6
        table.add_row("$ per 1M output tokens", f"{usd_per_million:.2f}")
    table.add_row(
        "$ per hour", f"{p.usd_per_hour:.2f} ({p.tp} x {p.gpu.usd_per_hour:g}; {p.gpu.price_source})"
    )
    return table


def _breakdown_table(p: Prediction) -> Table:
    assert p.breakdown is not None
    b = p.breakdown
    table = Table(
        title=f"prefill of {p.batch} x {p.prompt} tokens: one decoder layer (of {b.layers}), per GPU"
    )
    table.add_column("operator", style="bold")
    table.add_column("ms", justify="right")
    table.add_column("share of the prefill", justify="right")
    total = b.total
    rows = [*b.operators.items(), ("attention", b.attention), ("all-reduce x2", b.all_reduce)]
    for name, seconds in rows:
        table.add_row(name, f"{seconds * 1e3:.4f}", f"{b.layers * seconds / total:.1%}")
    table.add_row("layer, non-attention", f"{b.layer_non_attention * 1e3:.4f}", "", style="italic")
    once = [("embedding (once)", b.embedding), ("LM head (once)", b.lm_head), ("host overhead", b.overhead)]
    for name, seconds in once:
        table.add_row(name, f"{seconds * 1e3:.4f}", f"{seconds / total:.1%}")
    return table


def _public_fields(spec: GpuSpec | ModelSpec) -> dict[str, object]:
    return {key: value for key, value in vars(spec).items() if key not in ("name", "aliases")}
