"""``pfmon collector`` and the tools for the person at the switchboard.

* ``pfmon read``     one poll of one meter: decoded values with units (``--raw``: the
  registers in hex as read; ``--json``: the values as JSON);
* ``pfmon scan``     which unit ids answer on a bus, and which profile fits;
* ``pfmon timesync`` push the gateway's clock to a meter that keeps its own time;
* ``pfmon simulate`` the plant simulator: Modbus TCP meters, capacitor bank, relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
from pathlib import Path
from typing import Any

import orjson
import typer
from rich.progress import Progress
from rich.table import Table

from services.common import DURATION_OPTION, SITE_FILE_OPTION, fail, run_service
from services.common import console as make_console
from shared.errors import ConfigError, PeerError
from shared.site import BusConfig

console = make_console()
err_console = make_console(stderr=True)

HOST = typer.Option(None, "--host", help="Modbus TCP host (or serial gateway host).")
PORT = typer.Option(502, "--port", help="TCP port.")
SERIAL = typer.Option(None, "--serial", help="Serial device for Modbus RTU, e.g. /dev/ttyUSB0.")
BAUD = typer.Option(9600, "--baud", help="Serial baud rate.")
PARITY = typer.Option("N", "--parity", help="Serial parity N, E or O.")
RTU_TCP = typer.Option(False, "--rtu-over-tcp", help="RTU frames over TCP (serial gateway).")
TIMEOUT = typer.Option(1.0, "--timeout", help="Seconds to wait for each answer.")


def _bus(
    host: str | None,
    port: int,
    serial: str | None,
    baud: int,
    parity: str,
    rtu_tcp: bool,
    timeout: float,
) -> BusConfig:
    from pydantic import ValidationError

    from shared.modbus import quiet_library_logs
    from shared.site import format_validation_error

    quiet_library_logs()
    if not host and not serial:
        fail("say where the meter is: --host HOST [--port P] or --serial /dev/ttyUSB0")
    kind = "rtu" if serial else ("rtu_over_tcp" if rtu_tcp else "tcp")
    try:
        return BusConfig.model_validate(
            {
                "name": "cli",
                "kind": kind,
                "host": host,
                "port": port,
                "serial": serial,
                "baudrate": baud,
                "parity": parity.upper(),
                "timeout_s": timeout,
                "retries": 0,
            }
        )
    except ValidationError as exc:
        fail("; ".join(format_validation_error(exc)))


def _unit(unit: int) -> int:
    if not 1 <= unit <= 247:
        fail(f"--unit {unit}: Modbus unit ids are 1-247 (0 is broadcast, 248-255 reserved)")
    return unit


def register(app: typer.Typer) -> None:
    @app.command("collector")
    def _run(
        site_file: Path | None = SITE_FILE_OPTION,
        duration: float | None = DURATION_OPTION,
    ) -> None:
        """Poll the site's meters over Modbus and publish readings (edge)."""
        from services.collector.service import SERVICE, run

        run_service(SERVICE, run, site_file, duration)

    @app.command("read")
    def _read(
        unit: int = typer.Option(..., "--unit", "-u", help="Modbus unit id 1-247."),
        profile: str = typer.Option(..., "--profile", "-p", help="pmtr001, sdm630, pzem004t..."),
        host: str | None = HOST,
        port: int = PORT,
        serial: str | None = SERIAL,
        baud: int = BAUD,
        parity: str = PARITY,
        rtu_over_tcp: bool = RTU_TCP,
        timeout: float = TIMEOUT,
        raw: bool = typer.Option(False, "--raw", help="Also show the registers in hex."),
        as_json: bool = typer.Option(False, "--json", help="Print the values as JSON."),
        site_file: Path | None = typer.Option(
            None, "--site-file", "-s", help="Site YAML with user-defined profiles."
        ),
    ) -> None:
        """One poll of one meter: decoded values with units (check scale factors)."""
        from services.collector.profiles import resolve
        from shared.modbus import ModbusConnection
        from shared.site import load_site

        bus = _bus(host, port, serial, baud, parity, rtu_over_tcp, timeout)
        _unit(unit)
        try:
            user = load_site(site_file).profiles if site_file else None
            prof = resolve(profile, user)
        except ConfigError as exc:
            fail(str(exc))

        async def go() -> tuple[dict[str, dict[int, int]], list[tuple[str, int, list[int]]]]:
            conn = ModbusConnection(bus)
            regs: dict[str, dict[int, int]] = {"holding": {}, "input": {}}
            blocks = []
            try:
                for b in prof.plan():
                    got = await conn.read(unit, b.table, b.address, b.count)
                    blocks.append((b.table, b.address, got))
                    regs[b.table].update({b.address + i: v for i, v in enumerate(got)})
            finally:
                conn.close()
            return regs, blocks

        try:
            regs, blocks = asyncio.run(go())
        except PeerError as exc:
            fail(f"unit {unit} at {bus.serial or f'{bus.host}:{bus.port}'}: {exc}", code=1)
        values = prof.decode(regs)
        if as_json:
            out: dict[str, Any] = {m.value: v for m, v in values.items()}
            if raw:
                out = {
                    "values": out,
                    "registers": {f"{t}:{a}": [f"0x{w:04X}" for w in ws] for t, a, ws in blocks},
                }
            sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
            return
        table = Table(title=f"unit {unit} - {prof.name}: {prof.description}")
        table.add_column("measurement")
        table.add_column("value", justify="right")
        table.add_column("unit")
        table.add_column("register")
        for m, spec in prof.registers.items():
            value = values.get(m)
            shown = "(missing: device wrote 0)" if value is None else f"{value:.6g}"
            table.add_row(m.value, shown, m.unit, f"{spec.table} {spec.address} {spec.type}")
        console.print(table)
        if raw:
            for t, a, ws in blocks:
                console.print(f"[bold]{t} {a}..{a + len(ws) - 1}[/]")
                for i in range(0, len(ws), 8):
                    row = " ".join(f"{w:04X}" for w in ws[i : i + 8])
                    console.print(f"  {a + i:5d}: {row}")

    @app.command("scan")
    def _scan(
        host: str | None = HOST,
        port: int = PORT,
        serial: str | None = SERIAL,
        baud: int = BAUD,
        parity: str = PARITY,
        rtu_over_tcp: bool = RTU_TCP,
        timeout: float = typer.Option(0.3, "--timeout", help="Seconds to wait per unit."),
        first: int = typer.Option(1, "--from", help="First unit id."),
        last: int = typer.Option(247, "--to", help="Last unit id."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Find which unit ids (1-247) answer on a bus and the profile that fits."""
        from services.collector.scan import scan

        bus = _bus(host, port, serial, baud, parity, rtu_over_tcp, timeout)
        _unit(first)
        _unit(last)
        units = list(range(first, last + 1))
        with Progress(console=err_console, transient=True, disable=as_json) as progress:
            task = progress.add_task(f"scanning {len(units)} unit ids", total=len(units))
            found = asyncio.run(scan(bus, units, lambda: progress.advance(task)))
        if as_json:
            sys.stdout.write(orjson.dumps([f.as_dict() for f in found]).decode() + "\n")
            return
        table = Table(title=f"{len(found)} device(s) answering")
        table.add_column("unit", justify="right")
        table.add_column("profile")
        table.add_column("evidence")
        for f in found:
            table.add_row(str(f.unit), f.profile or "-", f.evidence)
        console.print(table)

    @app.command("timesync")
    def _timesync(
        unit: int = typer.Option(..., "--unit", "-u", help="Modbus unit id 1-247."),
        profile: str = typer.Option("pmtr001", "--profile", "-p"),
        host: str | None = HOST,
        port: int = PORT,
        serial: str | None = SERIAL,
        baud: int = BAUD,
        parity: str = PARITY,
        rtu_over_tcp: bool = RTU_TCP,
        timeout: float = TIMEOUT,
    ) -> None:
        """Push the gateway's clock to a device that keeps its own (PMTR_001 handshake)."""
        from services.collector.timesync import CLOCKS
        from shared.messages import utcnow
        from shared.modbus import ModbusConnection

        bus = _bus(host, port, serial, baud, parity, rtu_over_tcp, timeout)
        _unit(unit)
        if profile not in CLOCKS:
            fail(f"profile {profile!r} has no clock to set (known: {', '.join(CLOCKS)})")

        async def go() -> Any:
            conn = ModbusConnection(bus)
            try:
                return await CLOCKS[profile](conn, unit, utcnow())
            finally:
                conn.close()

        try:
            result = asyncio.run(go())
        except PeerError as exc:
            fail(f"unit {unit}: {exc}", code=1)
        drift = (
            "not exposed by the device" if result.drift_s is None else f"{result.drift_s:+.1f} s"
        )
        console.print(f"unit {unit}: clock set to epoch {result.pushed_epoch}; drift {drift}")

    @app.command("simulate")
    def _simulate(
        port: int = typer.Option(5020, "--port", help="First TCP port."),
        host: str = typer.Option("127.0.0.1", "--host"),
        meters: int = typer.Option(3, "--meters", min=0, help="Simulated meters (fleet)."),
        ports: int = typer.Option(1, "--ports", min=1, help="Spread the meters over N ports."),
        profile: str = typer.Option(
            "pmtr001", "--profile", help="pmtr001, sdm630, pzem004t or mixed."
        ),
        plant: bool = typer.Option(
            False,
            "--plant",
            help="Serve the PF-correction plant instead: meter unit 1 "
            "(sdm630, PF ~0.78), capacitor bank unit 10, relays unit 11.",
        ),
        seed: int = typer.Option(1, "--seed", help="Random seed (same seed, same plant)."),
        fault: list[str] = typer.Option(
            [],
            "--fault",
            help="UNIT:FAULT[:k=v,...][@START[+DURATION]], e.g. "
            "3:comm_loss@10+30 or 2:exception:code=2 or 1:reversed_ct:phase=2",
        ),
        framer: str = typer.Option("socket", "--framer", help="socket (Modbus TCP) or rtu."),
        waveform_site: str | None = typer.Option(
            None, "--waveform-site", help="Also publish waveform windows to MQTT as this site."
        ),
        waveform_every: float = typer.Option(1.0, "--waveform-every", min=0.1),
        duration: float | None = DURATION_OPTION,
    ) -> None:
        """Serve simulated meters (and a capacitor bank + relays) over Modbus TCP."""
        from services.collector.simulator import FAULTS, fleet_site, inductive_site
        from shared.logs import setup_logging
        from shared.service import run

        setup_logging("WARNING", "text")
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        try:
            if plant:
                sites = [inductive_site(seed=seed)]
            else:
                per = math.ceil(meters / ports) if meters else 0
                if per > 247:
                    fail(f"{meters} meters on {ports} port(s) is {per} per port; max 247")
                sites = []
                left = meters
                for k in range(ports):
                    n = min(per, left)
                    left -= n
                    prefix = f"p{k}meter" if ports > 1 else "meter"
                    sites.append(fleet_site(n, seed=seed + k, profile=profile, name_prefix=prefix))
            for spec in fault:
                _apply_fault(sites[0], spec, FAULTS)
        except (ValueError, KeyError) as exc:
            fail(str(exc))

        async def main(shutdown: Any) -> None:
            from services.collector.simulator import SimServer

            servers = [SimServer(s, port + k, host, framer=framer) for k, s in enumerate(sites)]
            for srv in servers:
                await srv.start()
            for k, s in enumerate(sites):
                units = sorted(s.meters)
                extra = ""
                if s.bank:
                    extra += f", bank unit {s.bank.unit} ({s.bank.steps} x {s.bank.kvar[0]:g} kvar)"
                if s.relays:
                    extra += f", relays unit {s.relays.unit}"
                span = f"{units[0]}..{units[-1]}" if units else "none"
                err_console.print(f"{framer} {host}:{port + k}: meters units {span}{extra}")
            err_console.print("stop with Ctrl-C")
            try:
                if waveform_site:
                    await _publish_waveforms(sites, waveform_site, waveform_every, shutdown)
                else:
                    await shutdown.wait()
            finally:
                for srv in servers:
                    await srv.stop()

        run(main, duration=duration)


def _apply_fault(site: Any, spec: str, known: dict[str, str]) -> None:
    """``UNIT:FAULT[:k=v,...][@START[+DURATION]]``."""
    when = None
    length = None
    if "@" in spec:
        spec, timing = spec.split("@", 1)
        start, _, dur = timing.partition("+")
        when = float(start)
        length = float(dur) if dur else None
    parts = spec.split(":")
    if len(parts) < 2:
        raise ValueError(f"--fault {spec!r}: expected UNIT:FAULT[:k=v,...]")
    unit, name = int(parts[0]), parts[1]
    if name not in known:
        raise ValueError(f"--fault {spec!r}: unknown fault {name!r}; known: {', '.join(known)}")
    params: dict[str, Any] = {}
    if len(parts) > 2:
        for kv in parts[2].split(","):
            k, _, v = kv.partition("=")
            params[k] = float(v) if "." in v else int(v)
    if unit not in site.meters:
        raise ValueError(f"--fault {spec!r}: no simulated meter with unit {unit}")
    if when is None:
        site.inject(name, unit, duration_s=length, **params)
    else:
        site.inject_at(when, name, unit, duration_s=length, **params)


async def _publish_waveforms(sites: list[Any], site_slug: str, every: float, shutdown: Any) -> None:
    from shared import topics
    from shared.bus import Bus, BusUnavailable
    from shared.settings import load_settings

    settings = load_settings()
    seq: dict[tuple[int, int], int] = {}  # per-source seq
    async with Bus(settings, service="simulate", site=site_slug, persistent=False) as bus:
        while not await shutdown.sleep(every):
            for k, s in enumerate(sites):
                for unit in s.meters:
                    seq[k, unit] = seq.get((k, unit), 0) + 1
                    wf = s.waveform(unit, site_slug, seq[k, unit])
                    with contextlib.suppress(BusUnavailable):
                        await bus.publish(topics.waveform(site_slug, wf.meter), wf)
