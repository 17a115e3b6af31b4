"""Walking skeleton: simulated Modbus TCP meter -> collector -> MQTT -> analytics ->
archiver -> PostgreSQL, over the machine's real Mosquitto and PostgreSQL."""

from __future__ import annotations

import asyncio
import math

import asyncpg

from services.analytics import service as analytics
from services.archiver import service as archiver
from services.collector import service as collector
from services.simulator import LoadModel, MeterFleet, expected_pf
from shared.embedded import free_port
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import parse_site


async def test_rows_arrive_with_the_right_values(settings: Settings, site_name: str) -> None:
    port = free_port()
    model = LoadModel(
        voltage_v=(230.0, 232.0, 228.0),
        current_a=(10.0, 20.0, 5.0),
        pf=(0.80, 0.90, 0.70),
        noise=0.0,
    )
    site = parse_site(
        {
            "site": site_name,
            "buses": [{"name": "b1", "host": "127.0.0.1", "port": port}],
            "meters": [
                {"name": "main", "bus": "b1", "unit": 7, "profile": "pmtr001", "interval_s": 0.2}
            ],
        }
    )
    shutdown, arch_ready, ana_ready = Shutdown(), Shutdown(), Shutdown()

    def svc_settings(name: str) -> Settings:
        return settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-{name}"})

    conn = await asyncpg.connect(settings.db_dsn)
    try:
        async with MeterFleet(port, {7: model}), asyncio.TaskGroup() as tg:
            tg.create_task(archiver.run(svc_settings("arch"), site, arch_ready))
            tg.create_task(analytics.run(svc_settings("ana"), site, ana_ready))
            # consumers subscribed before the producer starts
            await arch_ready.wait_ready(15)
            await ana_ready.wait_ready(15)
            tg.create_task(collector.run(svc_settings("col"), site, shutdown))
            rows: list[asyncpg.Record] = []
            for _ in range(100):
                await asyncio.sleep(0.1)
                try:
                    rows = await conn.fetch(
                        # per-reading rows (analytics' 3 s aggregates have no energy_s)
                        "SELECT * FROM pfm_metrics WHERE site = $1 AND energy_s IS NOT NULL"
                        " ORDER BY seq",
                        site_name,
                    )
                except asyncpg.UndefinedTableError:
                    continue
                if len(rows) >= 3:
                    break
            for each in (shutdown, arch_ready, ana_ready):
                each.request("test done")
        assert len(rows) >= 3, "metrics rows did not arrive in PostgreSQL"
        seqs = [r["seq"] for r in rows]
        assert seqs == sorted(set(seqs)), "duplicate or unordered seq"
        row = rows[-1]
        assert row["meter"] == "main"
        # registers hold 0.1 V, 0.01 A, 1 W and 0.01 pf resolution
        p_expected = sum(
            round(v * i * pf)
            for v, i, pf in zip(model.voltage_v, model.current_a, model.pf, strict=True)
        )
        s_expected = sum(v * i for v, i in zip(model.voltage_v, model.current_a, strict=True))
        assert row["power"] == p_expected
        assert math.isclose(row["apparent_power"], s_expected, rel_tol=1e-9)
        assert math.isclose(row["power_factor"], expected_pf(model), abs_tol=2e-3)
        assert math.isclose(row["voltage_l2"], 232.0, abs_tol=0.05)
        assert math.isclose(row["current_l3"], 5.0, abs_tol=0.005)
        # energy of the interval: P and S over the meter's poll interval (0.2 s)
        assert math.isclose(row["delta_import_wh"], p_expected * 0.2 / 3600, rel_tol=1e-9)
        assert math.isclose(row["delta_apparent_vah"], s_expected * 0.2 / 3600, rel_tol=1e-9)
    finally:
        await conn.close()
