"""``pfmon analytics`` and the analytics tools (``pfmon analyze FILE``)."""

from __future__ import annotations

from pathlib import Path

import typer

from services.common import DURATION_OPTION, SITE_FILE_OPTION, console, fail, run_service


def register(app: typer.Typer) -> None:
    @app.command("analytics")
    def _run(
        site_file: Path | None = SITE_FILE_OPTION,
        duration: float | None = DURATION_OPTION,
    ) -> None:
        """Compute PF, reactive power, THD, unbalance and alarms from readings and waveforms."""
        from services.analytics.service import SERVICE, run

        run_service(SERVICE, run, site_file, duration)

    @app.command("analyze")
    def _analyze(
        file: Path = typer.Argument(..., help="CSV capture: v,i or v1,v2,v3,i1,i2,i3 [,in] [,t]"),
        fs: float | None = typer.Option(
            None, "--fs", help="Sample rate in Hz (when the file has no 't' column)."
        ),
        f_nominal: int = typer.Option(50, "--f-nominal", help="Nominal frequency: 50 or 60."),
        v_nominal: float = typer.Option(
            230.0, "--v-nominal", help="Nominal line-to-neutral voltage (V)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        site_file: Path | None = typer.Option(
            None,
            "--site-file",
            "-s",
            help="Judge the alarm conditions with this site's thresholds and limits "
            "(default: pfmon's defaults at --v-nominal).",
            show_default=False,
        ),
    ) -> None:
        """Power-quality analysis of a scope/logger capture (IEEE 1459 quantities, THD,
        unbalance, broken-neutral score, the alarm conditions present)."""
        import orjson

        from services.analytics.analyze import (
            CaptureError,
            analyze_capture,
            format_table,
            read_capture,
        )

        if f_nominal not in (50, 60):
            fail(f"--f-nominal must be 50 or 60, got {f_nominal}")
        if fs is not None and not fs > 0:
            fail(f"--fs must be a positive sample rate in Hz, got {fs:g}")
        if not v_nominal > 0:
            fail(f"--v-nominal must be positive, got {v_nominal:g}")
        from shared.errors import ConfigError
        from shared.site import load_site

        try:
            site = load_site(site_file) if site_file is not None else None
            arrays, rate = read_capture(file, fs)
            result = analyze_capture(arrays, rate, float(f_nominal), v_nominal, str(file), site)
        except (CaptureError, ConfigError) as exc:
            fail(str(exc))
        if as_json:
            typer.echo(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY).decode())
        else:
            console().print(format_table(result))
