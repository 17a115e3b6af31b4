"""``pfmon actuator`` and the actuator's tools."""

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
