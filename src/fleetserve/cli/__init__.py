"""The `fleetserve` command. Each command group lives in its own module and is imported on first use,
so `fleetserve model predict` does not pay for importing the gateway or the simulator."""

from __future__ import annotations

import importlib
import importlib.util

import click

from fleetserve import __version__

# command name -> (module, attribute, one-line help shown by `fleetserve --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("fleetserve.cli.demo", "demo", "Run an emulated heterogeneous fleet behind the gateway."),
    "serve": ("fleetserve.cli.serve", "serve", "Start the gateway (and the engines) a fleet file describes."),
    "engine": ("fleetserve.cli.engine", "engine", "Run emulated engines or launch real ones."),
    "model": ("fleetserve.cli.model", "model", "Predict engine timings from the engine model."),
    "workload": ("fleetserve.cli.workload", "workload", "Generate and summarise request traces."),
    "sim": ("fleetserve.cli.sim", "sim", "Replay a trace against a simulated fleet."),
    "plan": ("fleetserve.cli.plan", "plan", "Plan the cheapest GPU mix for a trace, checked in the twin."),
    "bench": ("fleetserve.cli.bench", "bench", "Load-test a live OpenAI-compatible endpoint."),
    "tenant": ("fleetserve.cli.tenant", "tenant", "Make API keys for the fleet file's tenants."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, (module, _, _) in COMMANDS.items() if _module_exists(module))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS or not _module_exists(COMMANDS[cmd_name][0]):
            return None
        module, attribute, _ = COMMANDS[cmd_name]
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleetserve")
def cli() -> None:
    """fleetserve: one OpenAI-compatible front door for a heterogeneous LLM fleet,
    and a simulator that runs the same routing policies on a virtual clock."""


def main() -> None:
    cli()
