"""``pfmon collector`` and the tools for the person at the switchboard.

* ``pfmon read``     one poll of one meter: decoded values with units (``--raw``: the
  registers in hex as read; ``--json``: the values as JSON; ``--ct-ratio``/``--pt-ratio``:
  the secondary value the meter reports beside the primary value; ``--meter NAME
  --site-file FILE``: a meter of the site file with its bus, unit, profile and ratios);
* ``pfmon scan``     which unit ids answer on a bus, and which profile fits (``--bacnet``:
  which BACnet/IP devices answer a Who-Is);
* ``pfmon timesync`` push the gateway's clock to a meter that keeps its own time.
"""

from __future__ import annotations

import asyncio
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


def _ratio(option: str, text: str) -> float:
    """A CT/PT ratio as the site file takes it ("400/5" or a number); exit 2 if not."""
    from pydantic import TypeAdapter, ValidationError

    from shared.site.core import Ratio

    try:
        return TypeAdapter(Ratio).validate_python(text)
    except ValidationError as exc:
        msg = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        fail(f"{option} {text!r}: {msg}")


def _in_words(exc: PeerError) -> str:
    """The error, with what a Modbus exception usually means at commissioning."""
    hint = {
        1: "the device does not support this function for this table",
        2: "no such register on this device: check the table and address in its manual",
        3: "the device refuses this count here: try fewer registers",
    }.get(exc.code or 0)
    return f"{exc} - {hint}" if hint else str(exc)


def _unit(unit: int) -> int:
    if not 1 <= unit <= 247:
        fail(f"--unit {unit}: Modbus unit ids are 1-247 (0 is broadcast, 248-255 reserved)")
    return unit


_MODICON = {4: "holding", 3: "input"}
#: the 32-bit views of a register and the next one, as (column, decoder, word order)
_VIEWS_32 = [(f"{t}_{o}", t, o) for t in ("u32", "s32", "f32") for o in ("big", "little")]


def _raw_address(address: str, table: str | None) -> tuple[str, int]:
    """(table, 0-based address) from ``--address`` and ``--table``; exit 2 if unclear.

    Without ``--table`` the address is Modicon notation: 40001-49999 or 400001-465536 is
    holding register 0..., 30001-39999 or 300001-365536 input register 0...
    """
    try:
        number = int(address, 0)
    except ValueError:
        fail(f"--address {address!r}: not a number")
    if table is not None:
        if table not in ("holding", "input"):
            fail(f"--table {table!r}: holding or input")
        if not 0 <= number <= 0xFFFF:
            fail(f"--address {address}: a 0-based {table} address is 0-65535")
        return table, number
    for digits in (5, 6):
        first_digit, offset = divmod(number, 10 ** (digits - 1))
        if len(str(number)) == digits and first_digit in _MODICON and 1 <= offset <= 0x10000:
            return _MODICON[first_digit], offset - 1
    fail(
        f"--address {address}: Modicon notation is 4xxxx (holding, 40001 = address 0) or "
        "3xxxx (input); for a 0-based address say --table holding or --table input"
    )


def _raw_rows(table: str, address: int, words: list[int]) -> list[dict[str, Any]]:
    """Each register as hex, u16, s16, and with the next one as u32/s32/f32 in both orders."""
    from services.collector.profiles import DECODERS

    base = 40001 if table == "holding" else 30001
    rows: list[dict[str, Any]] = []
    for i, word in enumerate(words):
        row: dict[str, Any] = {
            "address": address + i,
            "modicon": base + address + i if address + i <= 9998 else None,
            "hex": f"0x{word:04X}",
            "u16": int(DECODERS["u16"]([word], "big")),
            "s16": int(DECODERS["s16"]([word], "big")),
        }
        pair = words[i : i + 2]
        for column, type_, order in _VIEWS_32:
            if len(pair) < 2:
                row[column] = None
                continue
            value = DECODERS[type_](pair, order)
            row[column] = value if type_ == "f32" else int(value)
        rows.append(row)
    return rows


def _show_raw(unit: int, table: str, address: int, words: list[int], as_json: bool) -> None:
    rows = _raw_rows(table, address, words)
    if as_json:
        out = {"unit": unit, "table": table, "address": address, "registers": rows}
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    grid = Table(
        title=f"unit {unit} - {table} {address}..{address + len(words) - 1} "
        "(32-bit columns: this register and the next; big = high word first)"
    )
    for column in ("address", "modicon", "hex", "u16", "s16"):
        grid.add_column(column, justify="right")
    for column, _, _ in _VIEWS_32:
        grid.add_column(column, justify="right")
    for row in rows:
        cells = []
        for key, value in row.items():
            if value is None:
                cells.append("-")
            elif key.startswith("f32"):
                cells.append(f"{value:.7g}")
            else:
                cells.append(str(value))
        grid.add_row(*cells)
    console.print(grid)


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
        unit: int | None = typer.Option(None, "--unit", "-u", help="Modbus unit id 1-247."),
        profile: str | None = typer.Option(
            None, "--profile", "-p", help="pmtr001, sdm630, pzem004t..."
        ),
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
        meter: str | None = typer.Option(
            None,
            "--meter",
            "-m",
            help="A meter of --site-file: its bus, unit, profile and CT/PT ratios "
            "(options given as well take precedence).",
        ),
        ct_ratio: str | None = typer.Option(
            None, "--ct-ratio", help="Current transformer, primary/secondary: 400/5 or 80."
        ),
        pt_ratio: str | None = typer.Option(
            None, "--pt-ratio", help="Voltage transformer, primary/secondary: 11000/110 or 100."
        ),
        address: str | None = typer.Option(
            None,
            "--address",
            "-a",
            help="Raw read without a profile: Modicon 40001 (holding 0) / 30001 (input 0), "
            "or a 0-based address with --table.",
        ),
        count: int = typer.Option(1, "--count", "-n", help="Registers to read raw (1-125)."),
        table_name: str | None = typer.Option(
            None, "--table", help="holding or input: --address is then 0-based."
        ),
        group: str | None = typer.Option(
            None,
            "--group",
            "-g",
            help="Also read a register group the profile does not poll (pmtr001: "
            "device_averages, the meter's own moving averages).",
        ),
    ) -> None:
        """One poll of one meter: decoded values with units (check scale factors); with
        CT/PT ratios the secondary value the meter reports and the primary."""
        from services.collector.profiles import resolve, to_primary
        from shared.modbus import ModbusConnection
        from shared.site import load_site

        try:
            site = load_site(site_file) if site_file else None
        except ConfigError as exc:
            fail(str(exc))
        ct = _ratio("--ct-ratio", ct_ratio) if ct_ratio is not None else None
        pt = _ratio("--pt-ratio", pt_ratio) if pt_ratio is not None else None
        if meter is not None:
            if site is None:
                fail(f"--meter {meter}: needs the site file that names it (--site-file)")
            try:
                mc = site.meter(meter)
            except KeyError:
                known = ", ".join(m.name for m in site.meters) or "none"
                fail(f"--meter {meter}: no meter of that name in {site_file} (meters: {known})")
            if mc.bacnet is not None:
                fail(
                    f"--meter {meter}: a BACnet meter; pfmon read speaks Modbus (pfmon scan "
                    "--bacnet --host ADDRESS finds the device)"
                )
            unit = mc.unit if unit is None else unit
            profile = mc.profile if profile is None else profile
            ct = mc.ct_ratio if ct is None else ct
            pt = mc.pt_ratio if pt is None else pt
            if host or serial:
                bus = _bus(host, port, serial, baud, parity, rtu_over_tcp, timeout)
            else:
                from shared.modbus import quiet_library_logs

                quiet_library_logs()
                bus = site.bus(mc.bus)
        else:
            bus = _bus(host, port, serial, baud, parity, rtu_over_tcp, timeout)
        if address is None and table_name is not None:
            fail("--table goes with --address (a raw read)")
        if address is not None and group is not None:
            fail("--group goes with a profile's read, not with --address (a raw read)")
        if address is not None and profile is None:
            if unit is None:
                fail("say which device: --unit")
            _unit(unit)
            raw_table, raw_address = _raw_address(address, table_name)
            if not 1 <= count <= 125:
                fail(f"--count {count}: one Modbus read takes 1-125 registers")
            if raw_address + count > 0x10000:
                fail(f"--address {address} --count {count}: runs past register 65535")

            async def read_raw() -> list[int]:
                conn = ModbusConnection(bus)
                try:
                    return await conn.read(unit, raw_table, raw_address, count)
                finally:
                    conn.close()

            try:
                words = asyncio.run(read_raw())
            except PeerError as exc:
                where = bus.serial or f"{bus.host}:{bus.port}"
                fail(f"unit {unit} at {where}: {_in_words(exc)}", code=1)
            _show_raw(unit, raw_table, raw_address, words, as_json)
            return
        if unit is None or profile is None:
            fail("say which meter: --unit and --profile, or --meter NAME with --site-file")
        _unit(unit)
        ct, pt = ct or 1.0, pt or 1.0
        try:
            prof = resolve(profile, site.profiles if site else None)
        except ConfigError as exc:
            fail(str(exc))
        factors = prof.primary_factors(ct, pt)
        extra = None
        if group is not None:
            extra = prof.groups.get(group)
            if extra is None:
                known = ", ".join(prof.groups) or "none"
                fail(f"--group {group}: profile {prof.name} has no such group (groups: {known})")
        if prof.reports_primary and (ct != 1.0 or pt != 1.0):
            err_console.print(
                f"[yellow]profile {prof.name} reports primary values (ratios set in the "
                "device): the CT/PT ratios are not applied[/]"
            )

        async def go() -> tuple[dict[str, dict[int, int]], list[tuple[str, int, list[int]]]]:
            conn = ModbusConnection(bus)
            regs: dict[str, dict[int, int]] = {"holding": {}, "input": {}}
            blocks = []
            try:
                for b in prof.plan() + (extra.plan() if extra else []):
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
        secondary = prof.decode(regs)
        values = to_primary(dict(secondary), factors)
        grouped: dict[str, float] = {}
        if extra is not None:
            for name, gv_value in extra.decode(regs).items():
                of = extra.values[name].of
                grouped[name] = gv_value * factors.get(of, 1.0)
        if as_json:
            out: dict[str, Any] = {m.value: v for m, v in values.items()}
            if raw or factors or extra is not None:
                out = {"values": out}
            if extra is not None:
                out[extra.name] = grouped
            if factors:
                out["secondary"] = {m.value: v for m, v in secondary.items()}
                out["ct_ratio"], out["pt_ratio"] = ct, pt
            if raw:
                out["registers"] = {f"{t}:{a}": [f"0x{w:04X}" for w in ws] for t, a, ws in blocks}
            sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
            return
        title = f"unit {unit} - {prof.name}: {prof.description}"
        if factors:
            title += f" (CT {ct:g}, PT {pt:g})"
        table = Table(title=title)
        table.add_column("measurement")
        if factors:
            table.add_column("secondary", justify="right")
            table.add_column("primary", justify="right")
        else:
            table.add_column("value", justify="right")
        table.add_column("unit")
        table.add_column("register")
        for m, spec in prof.registers.items():
            value = values.get(m)
            shown = "(missing: device wrote 0)" if value is None else f"{value:.6g}"
            cells = [shown]
            if factors:
                sec = secondary.get(m)
                cells = [shown if sec is None else f"{sec:.6g}", shown]
            table.add_row(m.value, *cells, m.unit, f"{spec.table} {spec.address} {spec.type}")
        console.print(table)
        if extra is not None:
            gtable = Table(title=f"{extra.name}: {extra.description}")
            for col in ("name", "value", "unit", "register"):
                gtable.add_column(col, justify="right" if col == "value" else "left")
            for name, gv in extra.values.items():
                v = grouped.get(name)
                shown = "(missing: device wrote 0)" if v is None else f"{v:.6g}"
                spec = gv.spec
                gtable.add_row(name, shown, gv.of.unit, f"{spec.table} {spec.address} {spec.type}")
            console.print(gtable)
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
        timeout: float | None = typer.Option(
            None, "--timeout", help="Seconds to wait per unit (0.3), or for I-Ams (--bacnet, 2)."
        ),
        first: int | None = typer.Option(
            None, "--from", help="First unit id (1), or device instance (--bacnet)."
        ),
        last: int | None = typer.Option(
            None, "--to", help="Last unit id (247), or device instance (--bacnet)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
        bacnet: bool = typer.Option(
            False,
            "--bacnet",
            help="BACnet/IP Who-Is instead: to --host (a device, directed) or broadcast.",
        ),
        bind: str | None = typer.Option(
            None,
            "--bind",
            help="With --bacnet: this machine's BACnet/IP address, e.g. 192.168.1.10/24 "
            "(the /prefix is needed for a broadcast) or 127.0.0.1:47900.",
        ),
    ) -> None:
        """Find which unit ids (1-247) answer on a bus and the profile that fits
        (--bacnet: which BACnet/IP devices answer a Who-Is)."""
        from services.collector.scan import scan

        if bacnet:
            _scan_bacnet(host, bind, timeout or 2.0, first, last, as_json)
            return
        bus = _bus(host, port, serial, baud, parity, rtu_over_tcp, timeout or 0.3)
        first = _unit(1 if first is None else first)
        last = _unit(247 if last is None else last)
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

    def _scan_bacnet(
        host: str | None,
        bind: str | None,
        timeout: float,
        first: int | None,
        last: int | None,
        as_json: bool,
    ) -> None:
        from pydantic import ValidationError

        from services.collector.scan import scan_bacnet
        from shared.site import format_validation_error
        from shared.site.core import BACNET_MAX_INSTANCE, bacnet_address_problem

        if not bind:
            fail("--bacnet needs --bind: this machine's BACnet/IP address, e.g. 192.168.1.10/24")
        for option, value in (("--from", first), ("--to", last)):
            if value is not None and not 0 <= value <= BACNET_MAX_INSTANCE:
                fail(f"{option} {value}: BACnet device instances are 0-{BACNET_MAX_INSTANCE}")
        if first is not None and last is not None and first > last:
            fail(f"--from {first} is above --to {last}")
        local, _, local_port = bind.partition(":")
        if host is not None and bacnet_address_problem(host):
            fail(f"--host {host!r}: {bacnet_address_problem(host)}")
        try:
            bus = BusConfig.model_validate(
                {
                    "name": "cli",
                    "kind": "bacnet",
                    "host": local,
                    "port": int(local_port) if local_port.isdigit() else local_port or None,
                    "timeout_s": min(timeout, 60.0),
                }
            )
        except ValidationError as exc:
            fail("--bind: " + "; ".join(format_validation_error(exc)))
        try:
            found = asyncio.run(scan_bacnet(bus, host, first, last, timeout))
        except (PeerError, ConfigError) as exc:
            fail(str(exc))
        if as_json:
            sys.stdout.write(orjson.dumps([d.as_dict() for d in found]).decode() + "\n")
            return
        table = Table(title=f"{len(found)} BACnet device(s) answering")
        table.add_column("device instance", justify="right")
        table.add_column("address")
        table.add_column("vendor id", justify="right")
        table.add_column("name")
        for d in found:
            table.add_row(str(d.instance), d.address, str(d.vendor_id), d.name or "-")
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
