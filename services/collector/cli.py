"""``pfmon collector`` and the collector's tools."""

from __future__ import annotations

from pathlib import Path

import typer

from services.common import DURATION_OPTION, SITE_FILE_OPTION, run_service


def register(app: typer.Typer) -> None:
    @app.command("collector")
    def _run(
        site_file: Path | None = SITE_FILE_OPTION,
        duration: float | None = DURATION_OPTION,
    ) -> None:
        """Poll the site's meters over Modbus and publish readings (edge)."""
        from services.collector.service import SERVICE, run

        run_service(SERVICE, run, site_file, duration)
