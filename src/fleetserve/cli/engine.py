"""`fleetserve engine`: run emulated engines (vLLM's API on the engine model), or launch real ones."""

from __future__ import annotations

import dataclasses
from typing import Any, get_args

import click

from fleetserve.cli.launch import llamacpp_command
from fleetserve.config import ConfigError, EngineArgs, load_fleet
from fleetserve.errors import InputError
from fleetserve.model.catalog import UnknownEntry


@click.group(name="engine")
def engine() -> None:
    """Run emulated engines, or launch real inference engines."""


engine.add_command(llamacpp_command)


def _engine_arg_options(command: Any) -> Any:
    """One option per EngineArgs field, named as vLLM names it (--max-num-seqs, --enable-prefix-caching)."""
    for name, info in reversed(EngineArgs.model_fields.items()):
        flag = "--" + name.replace("_", "-")
        if info.annotation is bool:
            option = click.option(
                f"{flag}/--no-{flag[2:]}",
                name,
                default=None,
                help=f"{info.description} [default: {info.default}]",
            )
        else:
            choices = get_args(info.annotation)
            kind: Any = click.Choice(choices) if choices else info.annotation
            option = click.option(
                flag, name, type=kind, default=None, help=f"{info.description} [default: {info.default}]"
            )
        command = option(command)
    return command


@engine.command("emulate")
@click.option(
    "--fleet",
    "fleet_file",
    type=click.Path(dir_okay=False),
    help="Start every emulated engine of this fleet file.",
)
@click.option("--gpu", help="GPU catalog name, e.g. h100-80g (see `fleetserve model list`).")
@click.option("--model", "model_name", help="Model catalog name, e.g. llama-3-8b.")
@click.option("--served-model-name", help="Name clients request (default: --model).")
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1, or the fleet file's].")
@click.option(
    "--port",
    default=8100,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="0 picks a free port. The default is emulator.base_port's, clear of the gateway's 8000.",
)
@click.option(
    "--tp", default=1, show_default=True, type=click.IntRange(min=1), help="Tensor-parallel degree."
)
@click.option(
    "--time-scale",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stretch every duration: 2 runs twice as slow as predicted [default: 1, or the fleet file's].",
)
@click.option(
    "--stream-interval",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Tokens per streamed chunk.",
)
@click.option("--max-model-len", type=click.IntRange(min=2), help="Context length (default: the model's).")
@click.option(
    "--tokenizer",
    "tokenizer_file",
    type=click.Path(exists=True, dir_okay=False),
    help="A Hugging Face tokenizer.json to count tokens exactly (default: a built-in hashing tokenizer).",
)
@click.option(
    "--lora-modules", multiple=True, metavar="NAME=PATH", help="LoRA adapter loaded at start; repeatable."
)
@click.option(
    "--kv-events-endpoint", help="Publish KV events on this ZMQ PUB endpoint, e.g. tcp://127.0.0.1:5557."
)
@click.option("--kv-events-replay-endpoint", help="ZMQ ROUTER endpoint that replays buffered KV events.")
@click.option("--kv-events-topic", default="", help="Topic frame of every KV-event message.")
@click.option(
    "--kv-events-format",
    type=click.Choice(["array", "map"]),
    default="array",
    show_default=True,
    help="Event encoding: vLLM's positional arrays, or named maps (newer vLLM).",
)
@click.option(
    "--natural-output-median",
    type=click.FloatRange(min=1),
    default=128.0,
    show_default=True,
    help="Median answer length in tokens when a request does not set ignore_eos.",
)
@click.option(
    "--catalog",
    "catalog_file",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML file with extra or overriding GPU/model catalog entries.",
)
@_engine_arg_options
def emulate(
    fleet_file: str | None,
    gpu: str | None,
    model_name: str | None,
    served_model_name: str | None,
    host: str | None,
    port: int,
    tp: int,
    time_scale: float | None,
    stream_interval: int,
    max_model_len: int | None,
    tokenizer_file: str | None,
    lora_modules: tuple[str, ...],
    kv_events_endpoint: str | None,
    kv_events_replay_endpoint: str | None,
    kv_events_topic: str,
    kv_events_format: str,
    natural_output_median: float,
    catalog_file: str | None,
    **engine_args: Any,
) -> None:
    """Run emulated engines: vLLM's OpenAI API, with timings from the engine model in real time.

    Either one engine (--gpu, --model, --port) or every `kind: emulated` engine of a fleet file
    (--fleet), all in one process and one event loop. Prints one ready line per engine.
    """
    from fleetserve.engines.emulator import server
    from fleetserve.engines.emulator.engine import EmulatorSpec, KVEventsSpec

    overrides = {name: value for name, value in engine_args.items() if value is not None}
    shared = {
        "stream_interval": stream_interval,
        "natural_output_median": natural_output_median,
        "catalog_file": catalog_file,
    }
    if fleet_file:
        if gpu or model_name:
            raise click.UsageError("--fleet starts the engines of the fleet file; drop --gpu/--model")
        try:
            fleet = load_fleet(fleet_file)
        except ConfigError as error:
            raise click.ClickException(str(error)) from None
        planned = server.specs_from_fleet(fleet)
        if not planned:
            raise click.ClickException(f"{fleet_file} has no engines of kind `emulated`")
        specs = []
        for spec, _ in planned:
            args = spec.engine_args.model_copy(update=overrides) if overrides else spec.engine_args
            scale = time_scale if time_scale is not None else spec.time_scale
            context = max_model_len if max_model_len is not None else spec.max_model_len
            tokenizer = tokenizer_file or spec.tokenizer_file  # --tokenizer overrides the fleet file's
            specs.append(
                dataclasses.replace(
                    spec,
                    engine_args=args,
                    time_scale=scale,
                    max_model_len=context,
                    tokenizer_file=tokenizer,
                    **shared,
                )
            )
        ports = [port for _, port in planned]
        host = host or fleet.emulator.host
    else:
        if not gpu or not model_name:
            raise click.UsageError("give --gpu and --model (or --fleet FILE)")
        kv_events = None
        if kv_events_endpoint:
            kv_events = KVEventsSpec(
                kv_events_endpoint,
                kv_events_replay_endpoint,
                kv_events_topic,
                kv_events_format,  # type: ignore[arg-type]
            )
        elif kv_events_replay_endpoint:
            raise click.UsageError("--kv-events-replay-endpoint needs --kv-events-endpoint")
        try:
            engine_config = EngineArgs(**overrides)
        except ValueError as error:
            raise click.UsageError(str(error)) from None
        specs = [
            EmulatorSpec(
                gpu=gpu,
                model=model_name,
                tp=tp,
                served_model_name=served_model_name,
                engine_args=engine_config,
                time_scale=time_scale if time_scale is not None else 1.0,
                max_model_len=max_model_len,
                lora_modules=tuple(_lora_module(item) for item in lora_modules),
                kv_events=kv_events,
                tokenizer_file=tokenizer_file,
                **shared,  # type: ignore[arg-type]
            )
        ]
        ports = [port]
        host = host or "127.0.0.1"
    try:
        server.run(specs, host, ports)
    except (UnknownEntry, InputError) as error:
        raise click.ClickException(str(error)) from None


def _lora_module(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise click.BadParameter(f"expected NAME=PATH, got {item!r}", param_hint="--lora-modules")
    return name, path
