"""The analytics service over the machine's real Mosquitto: readings and waveforms
in, metrics and events out (and a malformed payload does not stop anything)."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta

import aiomqtt
import numpy as np

from services.analytics import service as analytics
from shared import topics
from shared.measurements import Measurement as M
from shared.messages import DeadLetter, Event, Metrics, Reading, Waveform, decode, encode
from shared.service import Shutdown
from shared.settings import Settings, parse_mqtt_url
from shared.site import parse_site

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
FS = 6400.0
A = np.exp(2j * np.pi / 3)


def broken_neutral_waveform(site: str, seq: int, t: float) -> Waveform:
    n = 1280  # 10 cycles at 50 Hz
    e = [230.0, 230.0 * A**2, 230.0 * A]
    r = [5.0, 20.0, 40.0]
    vn = sum(ee / rr for ee, rr in zip(e, r, strict=True)) / sum(1 / x for x in r)
    tt = np.arange(n) / FS
    ch: dict[str, list[float]] = {}
    for k in range(3):
        vp = e[k] - vn
        ip = vp / r[k]
        w = 2 * np.pi * 50.0 * tt
        ch[f"v{k + 1}"] = (math.sqrt(2) * abs(vp) * np.cos(w + np.angle(vp))).tolist()
        ch[f"i{k + 1}"] = (math.sqrt(2) * abs(ip) * np.cos(w + np.angle(ip))).tolist()
    return Waveform(
        site=site,
        meter="scope",
        ts=T0 + timedelta(seconds=t),
        seq=seq,
        fs_hz=FS,
        channels=ch,  # type: ignore[arg-type]
    )


async def test_service_publishes_metrics_and_events(settings: Settings, site_name: str) -> None:
    timing = {"raise_after_s": 2, "clear_after_s": 2}
    site = parse_site(
        {
            "site": site_name,
            "analytics": {
                "alarm_slot_s": 5,
                "alarms": {"broken_neutral": timing, "low_pf": timing, "penalty_pf": timing},
                "meters": {"m1": {}, "scope": {}},  # sources that publish directly
            },
        }
    )
    shutdown = Shutdown()
    target = parse_mqtt_url(settings.mqtt_url)
    got_metrics: list[Metrics] = []
    metrics_topics: list[str] = []
    got_events: list[Event] = []
    dead: list[DeadLetter] = []
    svc_settings = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-a"})
    task = asyncio.create_task(analytics.run(svc_settings, site, shutdown))
    try:
        async with aiomqtt.Client(target.host, target.port) as client:
            await client.subscribe(topics.pattern(topics.Kind.METRICS, site_name), qos=1)
            await client.subscribe(topics.pattern(topics.Kind.EVENT, site_name), qos=1)
            await client.subscribe(topics.deadletter(site_name, "analytics"), qos=1)
            await shutdown.wait_ready(15)  # the service subscribed
            # a garbage payload first: dead-lettered, the service carries on
            await client.publish(topics.reading(site_name, "m1"), b"{not json", qos=1)
            for k in range(8):  # a low-PF magnitude-only meter, one reading per second
                vals: dict[M, float] = {}
                for ph in (1, 2, 3):
                    vals[M.per_phase("voltage", ph)] = 230.0
                    vals[M.per_phase("current", ph)] = 10.0
                    vals[M.per_phase("power", ph)] = 230.0 * 10.0 * 0.8
                    vals[M.per_phase("power_factor", ph)] = 0.8
                r = Reading(
                    site=site_name,
                    meter="m1",
                    ts=T0 + timedelta(seconds=k),
                    seq=100 + k,
                    profile="pmtr001",
                    values=vals,
                )
                await client.publish(topics.reading(site_name, "m1"), encode(r), qos=1)
            for k in range(6):
                wf = broken_neutral_waveform(site_name, 500 + k, float(k))
                await client.publish(topics.waveform(site_name, "scope"), encode(wf), qos=1)

            async def collect() -> None:
                async for msg in client.messages:
                    payload = bytes(msg.payload)  # type: ignore[arg-type]
                    if "/deadletter/" in msg.topic.value:
                        dead.append(decode(DeadLetter, payload))
                    elif "/metrics" in msg.topic.value:
                        got_metrics.append(decode(Metrics, payload))
                        metrics_topics.append(msg.topic.value)
                    else:
                        got_events.append(decode(Event, payload))
                    inst = [m for m in got_metrics if m.interval_s == 0]
                    codes = {(e.meter, e.code) for e in got_events}
                    want = {("m1", "penalty_pf"), ("scope", "broken_neutral")}
                    if len(inst) >= 14 and want <= codes and dead:
                        return

            await asyncio.wait_for(collect(), 20)
    finally:
        shutdown.request("test done")
        await asyncio.wait_for(task, 10)
    assert dead[0].payload() == b"{not json" and "JSON" in dead[0].reason
    # per-input metrics on the meter's metrics topic, aggregates a level below it
    aggregates = [(m, t) for m, t in zip(got_metrics, metrics_topics, strict=True) if m.aggregate]
    assert aggregates, "8 readings a second apart close 3 s aggregates"
    for m, t in aggregates:
        assert (
            t
            == topics.aggregate(site_name, m.meter, m.interval_s)
            == (f"pfm/v1/{site_name}/{m.meter}/metrics/{int(m.interval_s)}s")
        )
    for m, t in zip(got_metrics, metrics_topics, strict=True):
        assert m.aggregate or t == topics.metrics(site_name, m.meter)
    readings = [m for m in got_metrics if m.meter == "m1" and m.interval_s == 0]
    assert [m.source_seq for m in readings] == list(range(100, 108))
    last = readings[-1]
    assert math.isclose(last.values[M.POWER_FACTOR], 0.8, rel_tol=1e-9)
    assert math.isclose(last.values[M.APPARENT_POWER], 3 * 2300.0, rel_tol=1e-9)
    assert last.load["total"] == "unknown"
    assert math.isclose(last.averages["5s"][M.POWER], 3 * 1840.0, rel_tol=1e-9)
    waves = [m for m in got_metrics if m.meter == "scope" and m.interval_s == 0]
    assert len(waves) == 6 and waves[0].source == "waveform"
    assert waves[-1].values[M.NEUTRAL_SCORE] == 1.0
    assert waves[-1].values[M.ZERO_SEQ_UNBALANCE] > 10
    assert waves[-1].values[M.VOLTAGE_UNBALANCE] < 0.01
    assert len(waves[-1].harmonics["v1"]) == 50
    bn = next(e for e in got_events if e.code == "broken_neutral")
    assert bn.state == "raised" and bn.evidence["u0_pct"] is not None
    assert bn.evidence["u0_pct"] > 10
