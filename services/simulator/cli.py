"""``pfmon simulate``: serve the plant simulator on Modbus TCP (or RTU) from the shell.

A fleet of meters (``--meters``, ``--ports``, ``--profile``) or the PF-correction
plant (``--plant``: a meter, a capacitor bank and relays), faults on the command
line (``--fault``), and optionally waveform windows published to MQTT.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import typer

from services.common import DURATION_OPTION, fail
from services.common import console as make_console
from services.simulator.plant import SimSite

err_console = make_console(stderr=True)


def register(app: typer.Typer) -> None:
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
        bacnet_port: int | None = typer.Option(
            None,
            "--bacnet-port",
            min=1,
            max=65535,
            help="Also serve each meter as a BACnet/IP device (profile bacnet_power_meter): "
            "the k-th meter on UDP port BACNET_PORT+k, device instance 1000+unit.",
        ),
        duration: float | None = DURATION_OPTION,
    ) -> None:
        """Serve simulated meters (and a capacitor bank + relays) over Modbus TCP."""
        from services.simulator.plant import FAULTS
        from services.simulator.sites import fleet_site, inductive_site
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
            if bacnet_port is not None and bacnet_port + len(sites[0].meters) - 1 > 65535:
                fail(f"--bacnet-port {bacnet_port}: {len(sites[0].meters)} meters run past 65535")
        except (ValueError, KeyError) as exc:
            fail(str(exc))

        async def main(shutdown: Any) -> None:
            from services.simulator.server import SimServer

            servers = [SimServer(s, port + k, host, framer=framer) for k, s in enumerate(sites)]
            for srv in servers:
                await srv.start()
            devices: list[Any] = []
            if bacnet_port is not None:
                from services.simulator.bacnet import BacnetMeter

                for k, unit in enumerate(sorted(sites[0].meters)):
                    dev = BacnetMeter(
                        sites[0], unit, host=host, port=bacnet_port + k, device_instance=1000 + unit
                    )
                    devices.append(await dev.start())
                    err_console.print(
                        f"bacnet {host}:{bacnet_port + k}: device {1000 + unit} (meter unit {unit})"
                    )
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
                for dev in devices:
                    dev.stop()
                for srv in servers:
                    await srv.stop()

        run(main, duration=duration)


def _apply_fault(site: SimSite, spec: str, known: dict[str, str]) -> None:
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


async def _publish_waveforms(
    sites: list[SimSite], site_slug: str, every: float, shutdown: Any
) -> None:
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
