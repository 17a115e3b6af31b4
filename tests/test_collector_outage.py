"""Publishing without loss: a private broker stops for ~30 s mid-run and every seq
arrives exactly once; a full spool drops the oldest and counts them; the spool
survives a collector restart and drains in order."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from services.collector import service as collector
from services.simulator import Heater, SimServer, SimSite
from shared.bus import Backoff, Bus, Incoming
from shared.embedded import LocalMosquitto, free_port
from shared.messages import Reading
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import SiteConfig, parse_site
from shared.topics import Kind, pattern

FAST = Backoff(initial_s=0.2, max_s=1.0)


def sim_site() -> SimSite:
    sim = SimSite(seed=9)
    sim.add_load(Heater("h", kw=10.0))
    for unit in (1, 2, 3):
        sim.add_meter(unit, f"m{unit}", profile="pmtr001")
    return sim


def site_cfg(name: str, port: int, interval: float = 0.2) -> SiteConfig:
    return parse_site(
        {
            "site": name,
            "buses": [{"name": "b1", "host": "127.0.0.1", "port": port}],
            "meters": [
                {
                    "name": f"m{u}",
                    "bus": "b1",
                    "unit": u,
                    "profile": "pmtr001",
                    "interval_s": interval,
                    "time_sync": False,
                }
                for u in (1, 2, 3)
            ],
        }
    )


def make_settings(url: str, data: Path, cid: str) -> Settings:
    return Settings(
        mqtt_url=url, data_dir=data, metrics_port=0, mqtt_client_id=cid, log_format="text"
    )


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_broker_outage_every_seq_arrives_once(
    mosquitto: LocalMosquitto, tmp_path: Path, site_name: str
) -> None:
    port = free_port()
    site = site_cfg(site_name, port)
    got: dict[str, list[int]] = defaultdict(list)

    async def on_reading(r: Reading, _: Incoming) -> None:
        got[r.meter].append(r.seq)

    sub_settings = make_settings(mosquitto.url, tmp_path / "sub", f"pfm-test-{site_name}-sub")
    col_settings = make_settings(mosquitto.url, tmp_path / "col", f"pfm-test-{site_name}-col")
    metrics = ServiceMetrics("collector", site_name)
    shutdown = Shutdown()
    # a persistent subscriber: the broker keeps its QoS 1 messages while it is away
    async with (
        SimServer(sim_site(), port),
        Bus(sub_settings, service="sub", site=site_name, backoff=FAST) as sub,
    ):
        sub.subscribe(pattern(Kind.READING, site_name), Reading, on_reading)
        await sub.wait_connected(10)
        await asyncio.sleep(0.3)
        task = asyncio.create_task(
            collector.run(col_settings, site, shutdown, metrics=metrics, backoff=FAST)
        )
        await asyncio.sleep(3.0)
        before = sum(len(v) for v in got.values())
        assert before > 20, "readings did not flow before the outage"
        mosquitto.stop()
        t0 = time.monotonic()
        await asyncio.sleep(30.0)
        spooled = metrics.registry.get_sample_value("pfm_collector_spool_records")
        assert spooled is not None and spooled > 300, spooled  # 3 meters x 5 Hz x 30 s
        mosquitto.start()
        outage = time.monotonic() - t0
        await asyncio.sleep(5.0)  # reconnect, drain, keep polling a little
        shutdown.request("test done")
        await asyncio.wait_for(task, 20)
        await asyncio.sleep(1.0)
        assert metrics.registry.get_sample_value("pfm_collector_spool_records") == 0
    polls = {
        m: metrics.registry.get_sample_value("pfm_collector_polls_total", {"meter": m})
        for m in ("m1", "m2", "m3")
    }
    for meter, seqs in got.items():
        dupes = [s for s, n in Counter(seqs).items() if n > 1]
        assert not dupes, f"{meter}: duplicated seq {dupes[:10]}"
        missing = sorted(set(range(min(seqs), max(seqs) + 1)) - set(seqs))
        assert not missing, f"{meter}: lost seq {missing[:10]} (outage {outage:.0f} s)"
        assert len(seqs) == polls[meter]
    assert len(got) == 3


async def test_full_spool_drops_the_oldest_and_survives_a_restart(
    mqtt_url: str, tmp_path: Path, site_name: str
) -> None:
    port = free_port()
    site = site_cfg(site_name, port, interval=0.1)
    data = tmp_path / "col"
    dead_broker = f"mqtt://127.0.0.1:{free_port()}"
    metrics = ServiceMetrics("collector", site_name)
    async with SimServer(sim_site(), port):
        shutdown = Shutdown()
        task = asyncio.create_task(
            collector.run(
                make_settings(dead_broker, data, f"pfm-test-{site_name}-col"),
                site,
                shutdown,
                spool_max_records=30,
                metrics=metrics,
            )
        )
        await asyncio.sleep(2.5)
        shutdown.request("test done")
        await asyncio.wait_for(task, 10)
    polls = sum(
        metrics.registry.get_sample_value("pfm_collector_polls_total", {"meter": f"m{u}"}) or 0
        for u in (1, 2, 3)
    )
    dropped = metrics.registry.get_sample_value("pfm_collector_spool_dropped_total")
    assert polls > 40
    assert dropped == polls - 30  # everything beyond the newest 30 was dropped and counted
    # restart against a live broker: the 30 newest come out first, in order, then new ones
    got: list[tuple[str, int]] = []

    async def on_reading(r: Reading, _: Incoming) -> None:
        got.append((r.meter, r.seq))

    sub_settings = make_settings(mqtt_url, tmp_path / "sub", f"pfm-test-{site_name}-sub")
    async with (
        SimServer(sim_site(), port),
        Bus(sub_settings, service="sub", site=site_name, persistent=False) as sub,
    ):
        sub.subscribe(pattern(Kind.READING, site_name), Reading, on_reading)
        await sub.wait_connected(10)
        await asyncio.sleep(0.3)
        shutdown = Shutdown()
        task = asyncio.create_task(
            collector.run(
                make_settings(mqtt_url, data, f"pfm-test-{site_name}-col"), site, shutdown
            )
        )
        await asyncio.sleep(2.0)
        shutdown.request("test done")
        await asyncio.wait_for(task, 10)
        await asyncio.sleep(0.5)
    spooled = got[:30]
    per_meter: dict[str, list[int]] = defaultdict(list)
    for meter, seq in spooled:
        per_meter[meter].append(seq)
    for meter, seqs in per_meter.items():
        assert seqs == sorted(seqs), f"{meter} drained out of order"
    # the newest survived: the last spooled seq of each meter is close to its poll count
    assert max(s for _, s in spooled) >= polls // 3 - 2
    # after the restart seq continues (a clean stop: no gap, no repeat)
    for meter in ("m1", "m2", "m3"):
        seqs = [s for m, s in got if m == meter]
        assert len(seqs) == len(set(seqs))
        after = [s for m, s in got[30:] if m == meter]
        assert after and after[0] == max(per_meter[meter]) + 1, (meter, per_meter[meter], after[:3])


@pytest.mark.timeout(60)
async def test_readings_the_broker_refuses_are_dropped_and_counted_not_spooled(
    tmp_path: Path, site_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker whose ACL refuses the readings (MQTT v5 reason 0x87): each refusal is
    counted and logged, and none is spooled - a refused record at the head of the
    spool would hold back every record behind it, for ever."""
    acl = tmp_path / "acl"
    acl.write_text(f"topic read #\ntopic write pfm/v1/{site_name}/gateway/#\n")
    port = free_port()
    metrics = ServiceMetrics("collector", site_name)
    with LocalMosquitto(tmp_path / "mosq", extra_config=f"acl_file {acl}\n") as mosq:
        async with SimServer(sim_site(), port):
            shutdown = Shutdown()
            settings = make_settings(mosq.url, tmp_path / "col", f"pfm-test-{site_name}-acl")
            task = asyncio.create_task(
                collector.run(
                    settings.model_copy(update={"mqtt_protocol": "5"}),
                    site_cfg(site_name, port, interval=0.2),
                    shutdown,
                    metrics=metrics,
                )
            )
            await asyncio.sleep(2.5)
            shutdown.request("test done")
            await asyncio.wait_for(task, 10)
    value = metrics.registry.get_sample_value
    polls = sum(value("pfm_collector_polls_total", {"meter": f"m{u}"}) or 0 for u in (1, 2, 3))
    refused = value("pfm_publish_failures_total", {"service": "collector", "kind": "reading"})
    assert polls >= 20
    assert refused is not None and polls - 3 <= refused <= polls  # the last may be unsent
    assert value("pfm_collector_spool_records") == 0
    assert value("pfm_messages_published_total", {"service": "collector", "kind": "reading"}) in (
        None,
        0,
    )
    assert any("0x87" in r.getMessage() and "not spooled" in r.getMessage() for r in caplog.records)
