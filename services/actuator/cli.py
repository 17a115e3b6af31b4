"""``pfmon actuator`` and the actuator's tools (``pfmon rules check FILE``)."""

from __future__ import annotations

from pathlib import Path

import typer

from services.common import DURATION_OPTION, SITE_FILE_OPTION, run_service


def register(app: typer.Typer) -> None:
    @app.command("actuator")
    def _run(
        site_file: Path | None = SITE_FILE_OPTION,
        duration: float | None = DURATION_OPTION,
    ) -> None:
        """Drive relays and capacitor-bank steps from metrics (relay actions, PF controller)."""
        from services.actuator.service import SERVICE, run

        run_service(SERVICE, run, site_file, duration)

    rules = typer.Typer(help="Relay actions: validate a site file's actions and banks.")
    app.add_typer(rules, name="rules")

    @rules.command("check")
    def _check(
        site_file: Path = typer.Argument(..., help="site YAML file to validate"),
    ) -> None:
        """Validate relay actions and banks: exit 0, or print every error and exit 2."""
        from services.actuator.rules import check_file

        problems = check_file(site_file)
        if problems:
            typer.secho(f"{site_file}: {len(problems)} problem(s)", err=True, fg=typer.colors.RED)
            for problem in problems:
                typer.echo(f"  {problem}", err=True)
            raise typer.Exit(2)
        typer.echo(f"{site_file}: ok")
