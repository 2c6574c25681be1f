"""`fleetserve serve -c fleet.yaml`: the gateway in front of the fleet a fleet file describes, and the
engines it asks fleetserve to launch (`fleetserve.engines.fleet`, where what is launched how is
described). The engines started later through the admin API's `POST /engines {"group": ...}` are
started by the same launcher (`fleetserve.engines.actuator`)."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys

import click
import uvloop

from fleetserve.config import ConfigError, FleetConfig, load_fleet
from fleetserve.engines.actuator import LocalActuator
from fleetserve.engines.chat_templates import llamacpp_chat_renderers
from fleetserve.engines.fleet import (
    DEFAULT_READY_TIMEOUT_S,
    LaunchError,
    busy_ports,
    describe_launch,
    launch_engines,
)
from fleetserve.gateway.app import Gateway
from fleetserve.gateway.server import run_gateway
from fleetserve.routing import POLICIES

log = logging.getLogger(__name__)


@click.command()
@click.option(
    "-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Fleet file."
)
@click.option("--no-launch", is_flag=True, help="Do not start engines; serve those already running.")
@click.option("--port", type=click.IntRange(0, 65535), help="Gateway port (overrides gateway.port).")
@click.option(
    "--engine-base-port",
    type=click.IntRange(1, 65535),
    help="First port of the engines serve launches (overrides emulator.base_port; a group's own `port:`"
    " stays). KV-event sockets take HTTP port + 1000 and + 2000.",
)
@click.option("--policy", help="Routing policy (overrides router.policy), e.g. least_request.")
@click.option(
    "--ready-timeout",
    type=click.FloatRange(min=1),
    default=DEFAULT_READY_TIMEOUT_S,
    show_default=True,
    help="Seconds launched engines have to answer before serve gives up.",
)
def serve(
    config_path: str,
    no_launch: bool,
    port: int | None,
    engine_base_port: int | None,
    policy: str | None,
    ready_timeout: float,
) -> None:
    """Start the gateway (and the engines) a fleet file describes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_fleet(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if engine_base_port is not None:
        config = config.with_engine_base_port(engine_base_port)
    if policy is not None and policy not in POLICIES:
        valid = ", ".join(sorted(POLICIES))
        raise click.ClickException(f"unknown policy {policy!r}; valid policies: {valid}")
    for group in config.engines:
        if group.autoscale is not None:
            logging.getLogger(__name__).warning(
                "engines group %s: autoscale runs in the simulator only so far; serve keeps its %d"
                " replicas (the admin API can start and drain engines)",
                group.name,
                group.replicas,
            )
    gateway_port = config.gateway.port if port is None else port
    if gateway_port and busy_ports(config.gateway.host, [gateway_port]):
        raise click.ClickException(
            f"gateway port {gateway_port} on {config.gateway.host} is in use; pick another with --port"
        )
    # SIGTERM (docker stop, systemd) takes Ctrl-C's path, so the engines are stopped in order and the
    # temporary files removed; by default it would end the process as soon as uvicorn re-raised it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it handled
        try:
            uvloop.run(_serve(config, launch=not no_launch, port=port, policy=policy, timeout=ready_timeout))
        except LaunchError as exc:
            raise click.ClickException(str(exc)) from None


async def _serve(
    config: FleetConfig, *, launch: bool, port: int | None, policy: str | None, timeout: float
) -> None:
    renderers = llamacpp_chat_renderers(config)
    if not launch:
        gateway = Gateway(config, policy=policy, chat_renderers=renderers)
        await run_gateway(config, port=port, policy=policy, on_ready=_announce, gateway=gateway)
        return
    async with launch_engines(config, ready_timeout=timeout) as launched:
        for engine in launched.engines:
            click.echo(describe_launch(config, engine))
        gateway = Gateway(config, policy=policy, chat_renderers=renderers)
        actuator = LocalActuator(config, launched.launcher, gateway, launched.work_dir)
        gateway.actuator = actuator
        try:
            await run_gateway(config, port=port, policy=policy, on_ready=_announce, gateway=gateway)
        finally:
            await actuator.close()


def _announce(url: str) -> None:
    click.echo(f"fleetserve gateway listening on {url}")
    sys.stdout.flush()
