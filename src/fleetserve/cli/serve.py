"""`fleetserve serve -c fleet.yaml`: the gateway in front of the fleet a fleet file describes, and the
engines it asks fleetserve to launch (`fleetserve.engines.fleet`, where what is launched how is
described). The engines started later (the admin API's `POST /engines {"group": ...}`, the fleet
file's autoscalers) are started by the same launcher (`fleetserve.engines.actuator`), or, with
`--ray ADDRESS`, every launched engine runs on a Ray cluster (`fleetserve.engines.ray_actuator`)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time

import click
import uvloop

from fleetserve.autoscale.mix import GpuOption, LengthBuckets
from fleetserve.cli.sim import profile_store, profiles_option
from fleetserve.config import ConfigError, FleetConfig, load_fleet
from fleetserve.control import CannotStart
from fleetserve.engines.actuator import LocalActuator
from fleetserve.engines.chat_templates import llamacpp_chat_renderers
from fleetserve.engines.fleet import (
    DEFAULT_READY_TIMEOUT_S,
    LaunchError,
    busy_ports,
    describe_launch,
    launch_engines,
)
from fleetserve.engines.kinds import ENGINE_KINDS
from fleetserve.engines.ray_actuator import RayActuator, connect_ray
from fleetserve.gateway.app import Gateway
from fleetserve.gateway.server import run_gateway
from fleetserve.routing import POLICIES
from fleetserve.sim.profiles import planned_options

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
    "--ray",
    "ray_address",
    metavar="ADDRESS",
    help="Start the launched engines (the fleet file's, the admin API's and the autoscalers') as"
    " processes on the nodes of the Ray cluster at ADDRESS (its head's host:port, or `auto`) instead of"
    " this machine. Every node needs fleetserve installed and must be reachable from the gateway.",
)
@profiles_option
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
    ray_address: str | None,
    profile_dir: str | None,
    ready_timeout: float,
) -> None:
    """Start the gateway (and the engines) a fleet file describes, and run its autoscalers.

    Groups autoscaled by `planned` are profiled in the simulator first (every length bucket, cached on
    disk: see --profiles)."""
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
    gateway_port = config.gateway.port if port is None else port
    if gateway_port and busy_ports(config.gateway.host, [gateway_port]):
        raise click.ClickException(
            f"gateway port {gateway_port} on {config.gateway.host} is in use; pick another with --port"
        )
    # SIGTERM (docker stop, systemd) takes Ctrl-C's path, so the engines are stopped in order and the
    # temporary files removed; by default it would end the process as soon as uvicorn re-raised it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    planned = _planned_profiles(config, profile_dir) if config.planned_groups() and not no_launch else None
    if ray_address is not None:
        if no_launch:
            raise click.ClickException("--ray starts engines on a Ray cluster; --no-launch starts none")
        try:
            connect_ray(ray_address)
        except CannotStart as exc:
            raise click.ClickException(str(exc)) from None
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it handled
        try:
            if ray_address is not None:
                uvloop.run(
                    _serve_on_ray(config, port=port, policy=policy, timeout=ready_timeout, planned=planned)
                )
            else:
                uvloop.run(
                    _serve(
                        config,
                        launch=not no_launch,
                        port=port,
                        policy=policy,
                        timeout=ready_timeout,
                        planned=planned,
                    )
                )
        except LaunchError as exc:
            raise click.ClickException(str(exc)) from None


def _planned_profiles(config: FleetConfig, profile_dir: str | None) -> dict[str, GpuOption]:
    """The planned groups' GPU profiles over every length bucket: live traffic may bring any of them
    (measured in the simulator once, then read from the cache)."""
    store = profile_store(profile_dir)
    buckets = LengthBuckets().all()
    count = len(buckets) * len(config.planned_groups())
    click.echo(f"profiling the planned groups: {count} profiles (cached in {store.directory})")
    options = planned_options(config, buckets, store, workers=os.cpu_count() or 1)
    click.echo(f"profiles: {store.measured} measured, {store.hits} from the cache")
    return options


async def _serve(
    config: FleetConfig,
    *,
    launch: bool,
    port: int | None,
    policy: str | None,
    timeout: float,
    planned: dict[str, GpuOption] | None,
) -> None:
    renderers = llamacpp_chat_renderers(config)
    if not launch:
        for group in config.engines:
            if group.autoscale is not None:
                log.warning(
                    "engines group %s: not autoscaled with --no-launch (this gateway starts no engines)",
                    group.name,
                )
        gateway = Gateway(config, policy=policy, chat_renderers=renderers)
        await run_gateway(config, port=port, policy=policy, on_ready=_announce, gateway=gateway)
        return
    async with launch_engines(config, ready_timeout=timeout) as launched:
        for engine in launched.engines:
            click.echo(describe_launch(config, engine))
        gateway = Gateway(config, policy=policy, chat_renderers=renderers, planned_options=planned)
        actuator = LocalActuator(
            config, launched.launcher, gateway, launched.work_dir, launched=launched.engines
        )
        gateway.use_actuator(actuator)
        try:
            await run_gateway(config, port=port, policy=policy, on_ready=_announce, gateway=gateway)
        finally:
            await actuator.close()


async def _serve_on_ray(
    config: FleetConfig,
    *,
    port: int | None,
    policy: str | None,
    timeout: float,
    planned: dict[str, GpuOption] | None,
) -> None:
    """The gateway here, every launched engine on the Ray cluster: the fleet file's replicas are started
    through the actuator (named GROUP-N) before the first request, and registered as each comes up."""
    gateway = Gateway(
        config,
        policy=policy,
        chat_renderers=llamacpp_chat_renderers(config),
        actuator_launches=True,
        planned_options=planned,
    )
    actuator = RayActuator(config, gateway, ready_timeout=timeout)
    gateway.use_actuator(actuator)
    for group in config.engines:
        if ENGINE_KINDS[group.kind].launched:
            for _ in range(group.replicas):
                click.echo(
                    f"starting engine {actuator.start(group.name, time.monotonic())} on the Ray cluster"
                )
    try:
        await run_gateway(config, port=port, policy=policy, on_ready=_announce, gateway=gateway)
    finally:
        await actuator.close()


def _announce(url: str) -> None:
    click.echo(f"fleetserve gateway listening on {url}")
    sys.stdout.flush()
