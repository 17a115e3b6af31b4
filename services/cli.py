"""The ``pfmon`` command: one sub-command per service and per tool."""

from __future__ import annotations

import typer

from services import demo, init
from services.actuator import cli as actuator_cli
from services.alerts import cli as alerts_cli
from services.analytics import cli as analytics_cli
from services.archiver import cli as archiver_cli
from services.collector import cli as collector_cli
from services.console import cli as console_cli
from services.simulator import cli as simulator_cli
from services.tunnel import cli as tunnel_cli

app = typer.Typer(
    name="pfmon",
    help=(
        "pfmon - power-factor monitoring and correction for industrial sites.\n\n"
        "Services: collector (Modbus meters -> MQTT), analytics (PF, THD, unbalance, alarms), "
        "actuator (relays, capacitor banks), archiver (TimescaleDB/PostgreSQL), "
        "console (the operator's web page). "
        "Settings come from PFM_* environment variables; the site (meters, buses, rules) "
        "from a YAML file."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (
    collector_cli,
    analytics_cli,
    actuator_cli,
    archiver_cli,
    alerts_cli,
    console_cli,
    simulator_cli,
    tunnel_cli,
    demo,
    init,
):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
