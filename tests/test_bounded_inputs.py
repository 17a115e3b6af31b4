"""Hostile inputs cost bounded memory, metric labels and logs, over the real broker:
random meter names are dead letters under a fixed label; a 70 KB payload with 5,000
unknown keys gives a log line and a dead letter of bounded size in every service;
10,000 bad messages give a bounded number of log lines."""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest
from prometheus_client import generate_latest

from services.actuator import service as actuator
from services.analytics import service as analytics
from services.archiver import service as archiver
from shared import topics
from shared.bus import Bus
from shared.logs import MAX_MESSAGE, RateLimit, bounded
from shared.measurements import Measurement as M
from shared.messages import DeadLetter, Metrics, Reading
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import parse_site
from tests.helpers import listening

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def reading(site: str, meter: str, k: int) -> Reading:
    vals = {M.VOLTAGE_L1: 230.0, M.CURRENT_L1: 5.0, M.POWER_L1: 1000.0}
    return Reading(site=site, meter=meter, ts=T0, seq=k, profile="pmtr001", values=vals)


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """The root logger's warnings as a service writes them (JSON lines, bounded)."""
    out = io.StringIO()
    handler = bounded(logging.StreamHandler(out), use_json=True)
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.WARNING))
    yield out
    root.removeHandler(handler)
    root.setLevel(level)


async def test_unknown_meters_are_dead_letters_under_a_fixed_label(
    settings: Settings, site_name: str
) -> None:
    site = parse_site({"site": site_name, "analytics": {"meters": {"m0": {}}}})
    metrics = ServiceMetrics("analytics", site_name)
    ana = analytics.AnalyticsMetrics(metrics)
    names = [f"x{uuid.uuid4().hex}" for _ in range(2000)]
    svc = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-ana"})
    pub = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-pub"})
    async with (
        listening(
            settings, site_name, topics.pattern(topics.Kind.METRICS, site_name), Metrics
        ) as out,
        listening(
            settings, site_name, topics.deadletter(site_name, "analytics"), DeadLetter, "dl"
        ) as letters,
        Bus(svc, service="analytics", site=site_name, metrics=metrics, manual_ack=True) as bus,
        Bus(pub, service="test", site=site_name, persistent=False) as feed,
    ):
        app = analytics.Analytics(site, bus, ana)
        app.subscribe()
        await bus.wait_subscribed(10)
        await feed.wait_connected(10)
        for k, name in enumerate(names):  # in steps the broker's queue for one client holds
            feed.publish_nowait(topics.reading(site_name, name), reading(site_name, name, k))
            if k % 500 == 499:
                await letters.get(k + 1, timeout=30)
        # a known meter in the payload, another in the topic
        feed.publish_nowait(topics.reading(site_name, "zz"), reading(site_name, "m0", 0))
        for k in range(5):
            feed.publish_nowait(topics.reading(site_name, "m0"), reading(site_name, "m0", k))
        await feed.drain(20)
        await letters.get(len(names) + 1, timeout=30)
        await out.wait_for(lambda items: len(items) >= 5, 10)
        await asyncio.sleep(0.3)  # nothing else arrives
        assert await_unacked(app) == 0
    analysed = {m.meter for m in out.items if isinstance(m, Metrics)}
    assert analysed == {"m0"}
    assert app.engine.names == ["m0"]
    assert len(app.children) == 1
    reasons = {d.reason for d in letters.items if isinstance(d, DeadLetter)}
    assert f"meter {names[0]!r} is not in the site file of {site_name!r}" in reasons
    mismatch = f"payload site {site_name!r} meter 'm0' differ from the topic's site {site_name!r}"
    assert f"{mismatch} meter 'zz'" in reasons
    assert ana.rejected.labels("_unknown", "unknown_meter")._value.get() == len(names)
    assert ana.rejected.labels("_unknown", "topic_mismatch")._value.get() == 1
    page = generate_latest(metrics.registry).decode()
    assert not any(name in page for name in names)
    assert len(page) < 40_000, len(page)


def await_unacked(app: analytics.Analytics) -> int:
    return app.acks.waiting


def huge_payload(site: str) -> bytes:
    """A reading of ~70 KB with 5,000 keys no schema knows."""
    body = orjson.loads(reading(site, "m1", 1).model_dump_json(by_alias=True))
    for k in range(5000):
        body[f"x_{k:04d}"] = k
    data = orjson.dumps(body)
    assert 65_000 <= len(data) <= 110_000
    return data


K = topics.Kind
SERVICES = [
    pytest.param(analytics.run, K.READING, "analytics", id="analytics"),
    pytest.param(archiver.run, K.METRICS, "archiver", id="archiver"),
    pytest.param(actuator.run, K.METRICS, "actuator", id="actuator"),
]


@pytest.mark.parametrize(("run", "kind", "service"), SERVICES)
async def test_a_huge_bad_message_gives_bounded_logs_and_dead_letter(
    settings: Settings, site_name: str, log_output: io.StringIO, run: object, kind: K, service: str
) -> None:
    site = parse_site({"site": site_name, "analytics": {"meters": {"m1": {}}}})
    topic = f"{topics.ROOT}/{site_name}/m1/{kind.value}"
    payload = huge_payload(site_name)
    shutdown = Shutdown()
    async with listening(
        settings, site_name, topics.deadletter(site_name, service), DeadLetter
    ) as letters:
        task = asyncio.create_task(run(settings, site, shutdown))  # type: ignore[operator]
        try:
            await shutdown.wait_ready(10)  # subscribed
            before = len(log_output.getvalue())
            pub = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-p"})
            async with Bus(pub, service="test", site=site_name, persistent=False) as feed:
                await feed.wait_connected(10)
                await feed.publish(topic, payload)
            items = await letters.get(1, timeout=15)
            await asyncio.sleep(0.2)
            logged = log_output.getvalue()[before:]
        finally:
            shutdown.request("test done")
            await asyncio.wait_for(task, 20)
    letter = items[0]
    assert isinstance(letter, DeadLetter)
    assert letter.payload() == payload[:65536]  # the payload's head, at most 64 KiB
    assert len(letter.reason) < 1500
    assert "more problems" in letter.reason
    lines = [line for line in logged.splitlines() if "dead-lettered" in line]
    assert len(lines) == 1
    assert len(logged.encode()) < 4000, logged[:500]
    entry = orjson.loads(lines[0])
    assert len(entry["msg"]) <= MAX_MESSAGE + 40
    assert "chars cut" in entry["msg"] or len(entry["msg"]) < MAX_MESSAGE


async def test_ten_thousand_bad_messages_give_a_bounded_number_of_log_lines(
    settings: Settings, site_name: str, log_output: io.StringIO
) -> None:
    site = parse_site({"site": site_name})
    shutdown = Shutdown()
    n = 10_000
    async with listening(
        settings, site_name, topics.deadletter(site_name, "analytics"), DeadLetter
    ) as letters:
        task = asyncio.create_task(analytics.run(settings, site, shutdown))
        try:
            await shutdown.wait_ready(10)
            pub = settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-p"})
            async with Bus(pub, service="test", site=site_name, persistent=False) as feed:
                await feed.wait_connected(10)
                for k in range(n):  # in steps the broker's queue for one client holds
                    feed.publish_nowait(topics.reading(site_name, "m1"), b"{not json %d" % k)
                    if k % 500 == 499:
                        await letters.get(k + 1, timeout=30)
            await letters.get(n, timeout=60)
        finally:
            shutdown.request("test done")
            await asyncio.wait_for(task, 20)
    lines = [line for line in log_output.getvalue().splitlines() if "dead-lettered" in line]
    assert 1 <= len(lines) <= 20, len(lines)


def test_rate_limit_says_how_many_were_suppressed() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        logging.Formatter("%(message)s %(suppressed)s", defaults={"suppressed": 0})
    )
    limit = RateLimit(burst=3, interval_s=0.2)
    handler.addFilter(limit)
    log = logging.getLogger(f"test.ratelimit.{uuid.uuid4().hex}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    for k in range(50):
        log.warning("bad input %d", k)
        log.info("not limited %d", k)
    assert out.getvalue().count("bad input") == 3
    assert out.getvalue().count("not limited") == 50
    time.sleep(0.25)
    log.warning("bad input %d", 99)
    assert out.getvalue().splitlines()[-1] == "bad input 99 47"
