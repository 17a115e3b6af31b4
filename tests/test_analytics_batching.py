"""The analytics service's batching over the real broker: a burst of readings from
several meters is analysed in batches with every reading accounted for, each meter's
inputs in arrival order, results equal to feeding the engine one reading at a time;
a meter beyond the bound is refused without stopping the others."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from services.analytics import service as analytics
from services.analytics.batch import SiteEngine
from shared import topics
from shared.bus import Bus
from shared.measurements import Measurement as M
from shared.messages import Metrics, Reading
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import SiteConfig, parse_site
from tests.helpers import listening

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def reading(site: str, meter: str, k: int, pf: float) -> Reading:
    vals: dict[M, float] = {}
    for ph in (1, 2, 3):
        vals[M.per_phase("voltage", ph)] = 229.0 + ph + 0.1 * k
        vals[M.per_phase("current", ph)] = 10.0 + k % 3
        vals[M.per_phase("power", ph)] = (229.0 + ph) * (10.0 + k % 3) * pf
    return Reading(
        site=site,
        meter=meter,
        ts=T0 + timedelta(seconds=0.5 * k),
        seq=k,
        profile="pmtr001",
        values=vals,
    )


def site_cfg(name: str, window_s: float) -> SiteConfig:
    meters = {m: {} for m in ("m0", "m1", "m2", "m3", "m4", "bad")}
    return parse_site(
        {
            "site": name,
            "analytics": {"batch_window_s": window_s, "batch_max": 7, "meters": meters},
        }
    )


async def test_burst_is_batched_in_order_and_equals_one_at_a_time(
    settings: Settings, site_name: str
) -> None:
    site = site_cfg(site_name, 0.2)
    meters = [f"m{j}" for j in range(5)]
    sent = [
        reading(site_name, m, k, 0.7 + 0.05 * j) for k in range(6) for j, m in enumerate(meters)
    ]
    shutdown = Shutdown()
    svc = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-a"})
    task = asyncio.create_task(analytics.run(svc, site, shutdown))
    try:
        pattern = topics.pattern(topics.Kind.METRICS, site_name)
        async with listening(settings, site_name, pattern, Metrics) as inbox:
            await shutdown.wait_ready(15)  # the service subscribed
            pub = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-p"})
            async with Bus(pub, service="test", site=site_name, persistent=False) as bus:
                await bus.wait_connected(10)
                for r in sent:  # one burst, meters interleaved
                    bus.publish_nowait(topics.reading(site_name, r.meter), r)
                await bus.drain(10)

            def per_reading(items: list[object]) -> list[Metrics]:
                return [m for m in items if isinstance(m, Metrics) and not m.aggregate]

            await inbox.wait_for(lambda items: len(per_reading(items)) >= len(sent), 20)
            got = per_reading(inbox.items)
    finally:
        shutdown.request("test done")
        await asyncio.wait_for(task, 10)
    assert len(got) == len(sent)
    reference = SiteEngine(site)  # the same inputs, one at a time
    expected = {}
    for r in sent:
        out = reference.on_readings([r])[0].metrics[0]
        expected[(r.meter, r.seq)] = out
    for meter in meters:
        mine = [m for m in got if m.meter == meter]
        assert [m.source_seq for m in mine] == list(range(6)), meter  # arrival order
        seqs = [m.seq for m in mine]
        assert seqs == list(range(seqs[0], seqs[0] + 6)), meter  # contiguous per meter
        for m in mine:
            ref = expected[(meter, m.source_seq)]
            assert m.values.keys() == ref.values.keys()
            for key, v in ref.values.items():
                assert abs(m.values[key] - v) <= 1e-9 * max(1.0, abs(v)), (meter, key)
            assert m.averages.keys() == ref.averages.keys()
            for slot, avg in ref.averages.items():
                for key, v in avg.items():
                    assert abs(m.averages[slot][key] - v) <= 1e-9 * max(1.0, abs(v))


async def test_meter_beyond_the_bound_is_refused_others_flow(
    settings: Settings, site_name: str
) -> None:
    site = site_cfg(site_name, 0.0)
    metrics = ServiceMetrics("analytics", site_name)
    ana = analytics.AnalyticsMetrics(metrics)
    pattern = topics.pattern(topics.Kind.METRICS, site_name)
    async with listening(settings, site_name, pattern, Metrics) as inbox:
        svc = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-b"})
        async with Bus(svc, service="analytics", site=site_name, metrics=metrics) as bus:
            await bus.wait_connected(10)
            app = analytics.Analytics(site, bus, ana, max_meters=2)
            for k in range(3):
                for meter in ("m1", "m2", "m3"):
                    r = reading(site_name, meter, k, 0.9)
                    await app.on_reading(r, None)  # type: ignore[arg-type]
                await asyncio.sleep(0.05)
            await app.drain()
        await inbox.wait_for(lambda items: len(items) >= 6, 10)
        await asyncio.sleep(0.3)  # nothing more arrives
        got = sorted((m.meter, m.source_seq) for m in inbox.items if isinstance(m, Metrics))
    assert got == [("m1", 0), ("m1", 1), ("m1", 2), ("m2", 0), ("m2", 1), ("m2", 2)]
    refused = ana.rejected.labels("_untracked", "too_many_meters")._value.get()
    assert refused == 3


async def test_a_batch_that_trips_a_bug_is_analysed_one_by_one(
    settings: Settings, site_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error in a batch (a bug, not bad input) costs only the reading
    that trips it: the others are analysed one by one and published."""
    site = site_cfg(site_name, 0.0)
    metrics = ServiceMetrics("analytics", site_name)
    ana = analytics.AnalyticsMetrics(metrics)
    pattern = topics.pattern(topics.Kind.METRICS, site_name)
    async with listening(settings, site_name, pattern, Metrics) as inbox:
        svc = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-c"})
        async with Bus(svc, service="analytics", site=site_name, metrics=metrics) as bus:
            await bus.wait_connected(10)
            app = analytics.Analytics(site, bus, ana)
            real = app.engine.on_readings

            def flaky(readings: list[Reading]) -> list[object]:
                if any(r.meter == "bad" for r in readings):
                    raise RuntimeError("simulated engine bug")
                return real(readings)  # type: ignore[return-value]

            monkeypatch.setattr(app.engine, "on_readings", flaky)
            for meter in ("m1", "bad", "m2"):
                await app.on_reading(reading(site_name, meter, 0, 0.9), None)  # type: ignore[arg-type]
            app.flush()
            await app.drain()
        await inbox.wait_for(lambda items: len(items) >= 2, 10)
        await asyncio.sleep(0.3)
        got = sorted(m.meter for m in inbox.items if isinstance(m, Metrics))
    assert got == ["m1", "m2"]
    assert ana.rejected.labels("bad", "reading")._value.get() == 1
