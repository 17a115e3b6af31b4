"""``pfmon analytics`` and the analytics's tools."""

from __future__ import annotations

from pathlib import Path

import typer

from services.common import DURATION_OPTION, SITE_FILE_OPTION, run_service


def register(app: typer.Typer) -> None:
    @app.command("analytics")
    def _run(
        site_file: Path | None = SITE_FILE_OPTION,
        duration: float | None = DURATION_OPTION,
    ) -> None:
        """Compute PF, reactive power, THD, unbalance and alarms from readings and waveforms."""
        from services.analytics.service import SERVICE, run

        run_service(SERVICE, run, site_file, duration)
