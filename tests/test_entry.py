"""Plausible at the entry, finite in the output: one bad input costs nothing else.

A value no meter can measure (``current_l1 = 1e308``), a ``seq`` beyond a bigint, a
``ts`` in year 9999 or 0001 or hours ahead of the receiver's clock are refused where
they enter, with a dead letter that names them; the rest of the reading and every
other input keep flowing, over the real broker, database and Modbus simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from services.analytics import service as analytics
from services.analytics.service import Analytics, AnalyticsMetrics
from services.archiver import service as archiver
from services.collector import service as collector
from services.simulator import SimServer, SimSite
from shared import topics
from shared.bus import Bus
from shared.embedded import free_port
from shared.errors import ConfigError
from shared.measurements import Measurement as M
from shared.messages import (
    DEFAULT_MAX_CLOCK_SKEW_S,
    DeadLetter,
    Metrics,
    Reading,
    ValidationError,
    Waveform,
    describe_error,
    max_clock_skew,
    set_max_clock_skew,
    utcnow,
)
from shared.metrics import ServiceMetrics
from shared.service import Shutdown
from shared.settings import Settings, load_settings
from shared.site import SiteConfig, parse_site
from tests.helpers import Inbox, listening

pytestmark = pytest.mark.timeout(90)

#: a healthy three-phase reading (SI units)
GOOD: dict[str, float] = {
    **{f"voltage_l{n}": 230.0 for n in (1, 2, 3)},
    **{f"current_l{n}": 10.0 for n in (1, 2, 3)},
    **{f"power_l{n}": 2000.0 for n in (1, 2, 3)},
    "frequency": 50.0,
}


def payload(meter: str, site: str, seq: int | str, ts: datetime | str, **values: float) -> bytes:
    """A reading as raw JSON (``seq`` may be any integer: orjson stops at 64 bits)."""
    stamp = ts if isinstance(ts, str) else ts.isoformat().replace("+00:00", "Z")
    body = {
        "schema": "pfm.reading/1",
        "site": site,
        "meter": meter,
        "ts": stamp,
        "seq": "SEQ",
        "profile": "sdm630",
        "values": {**GOOD, **values},
    }
    return orjson.dumps(body).replace(b'"SEQ"', str(seq).encode())


def svc(settings: Settings, name: str) -> Settings:
    return settings.model_copy(update={"mqtt_client_id": f"{settings.mqtt_client_id}-{name}"})


def site_with(site_name: str, meters: list[str], **extra: Any) -> SiteConfig:
    return parse_site(
        {
            "site": site_name,
            "buses": [{"name": "b1", "host": "127.0.0.1"}],
            "meters": [
                {"name": name, "bus": "b1", "unit": k + 1, "profile": "sdm630"}
                for k, name in enumerate(meters)
            ],
            **extra,
        }
    )


@contextlib.asynccontextmanager
async def publisher(settings: Settings, site: str) -> AsyncIterator[Bus]:
    async with Bus(svc(settings, "pub"), service="test", site=site, persistent=False) as bus:
        await bus.wait_connected(10)
        yield bus


def metrics_of(inbox: Inbox, meter: str) -> list[Metrics]:
    return [m for m in inbox.items if isinstance(m, Metrics) and m.meter == meter]


# -- the schema --------------------------------------------------------------------------


def refusal(raw: bytes) -> str:
    with pytest.raises(ValidationError) as err:
        Reading.model_validate_json(raw)
    return describe_error(err.value)


def test_seq_and_ts_are_bounded_in_the_schema() -> None:
    now = utcnow()
    assert Reading.model_validate_json(payload("m", "s", 2**63 - 1, now)).seq == 2**63 - 1
    assert "seq: Input should be less than or equal to 9223372036854775807" in refusal(
        payload("m", "s", 2**64, now)
    )
    assert "seq:" in refusal(payload("m", "s", -1, now))
    assert "ts: Input should be less than 2100-01-01" in refusal(
        payload("m", "s", 1, "9999-12-31T23:59:59Z")
    )
    assert "ts: Input should be greater than or equal to 2000-01-01" in refusal(
        payload("m", "s", 1, "0001-01-01T00:00:00Z")
    )
    # ahead of the receiver's clock: refused with the skew; a week old is fine (a spool)
    why = refusal(payload("m", "s", 1, now + timedelta(hours=2)))
    assert "ts:" in why and "ahead of this receiver's clock" in why
    ahead = int(why.split(" is ")[1].split(" s ahead")[0])
    assert 7190 <= ahead <= 7200
    assert Reading.model_validate_json(payload("m", "s", 1, now - timedelta(days=7)))
    with pytest.raises(ValidationError, match="source_seq"):
        Metrics.model_validate(
            {"site": "s", "meter": "m", "ts": now, "seq": 1, "interval_s": 0.0, "values": {}}
            | {"source_seq": 2**64}
        )


def test_clock_skew_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    now = utcnow()
    ahead = payload("m", "s", 1, now + timedelta(seconds=120))
    try:
        assert Reading.model_validate_json(ahead)  # within the default 600 s
        monkeypatch.setenv("PFM_MAX_CLOCK_SKEW_S", "60")
        load_settings()
        assert max_clock_skew() == 60.0
        assert "(at most 60 s allowed" in refusal(ahead)
        monkeypatch.setenv("PFM_MAX_CLOCK_SKEW_S", "-5")
        with pytest.raises(ConfigError) as err:
            load_settings()
        assert "PFM_MAX_CLOCK_SKEW_S" in err.value.problems[0]
    finally:
        set_max_clock_skew(DEFAULT_MAX_CLOCK_SKEW_S)


def test_a_reading_keeps_its_sound_values_and_names_the_refused_ones() -> None:
    now = utcnow()
    for raw, name, why in (
        (payload("m", "s", 1, now, current_l1=1e308), "current_l1 = 1e+308", "plausible range"),
        (payload("m", "s", 1, now, power_factor=3.0), "power_factor = 3.0", "[-1, 1]"),
        (payload("m", "s", 1, now, voltage_l2=-230.0), "voltage_l2 = -230.0", "[0, 1e+06] V"),
        (
            payload("m", "s", 1, now).replace(b'"frequency":50.0', b'"frequency":NaN'),
            "frequency = nan",
            "not a finite number",
        ),
        (
            payload("m", "s", 1, now).replace(b'"frequency":50.0', b'"frequency":1e999'),
            "frequency = inf",
            "not a finite number",
        ),
    ):
        with pytest.raises(ValidationError) as err:
            Reading.model_validate_json(raw)
        kept = Reading.salvage(raw, err.value)
        assert kept is not None, raw
        reading, reason = kept
        assert isinstance(reading, Reading)
        assert name in reason and why in reason, reason
        refused = M(name.split(" = ")[0])
        assert set(reading.values) == {M(k) for k in GOOD} - {refused}
    # nothing sound left, or a fault that is not a value: the whole reading is refused
    only_bad = orjson.dumps(
        {**orjson.loads(payload("m", "s", 1, now)), "values": {"current_l1": 1e308}}
    )
    with pytest.raises(ValidationError) as err:
        Reading.model_validate_json(only_bad)
    assert Reading.salvage(only_bad, err.value) is None
    bad_seq = payload("m", "s", 2**64, now, current_l1=1e308)
    with pytest.raises(ValidationError) as err:
        Reading.model_validate_json(bad_seq)
    assert Reading.salvage(bad_seq, err.value) is None


def test_computed_values_and_samples_must_be_finite() -> None:
    base = {"site": "s", "meter": "m", "ts": utcnow(), "seq": 1, "interval_s": 0.0}
    with pytest.raises(ValidationError, match=r"values\.demand_apparent_power"):
        Metrics.model_validate({**base, "values": {"demand_apparent_power": math.inf}})
    with pytest.raises(ValidationError, match=r"averages\.5s\.power"):
        Metrics.model_validate({**base, "values": {}, "averages": {"5s": {"power": math.nan}}})
    with pytest.raises(ValidationError, match=r"channels\.i1\.1"):
        Waveform.model_validate(
            {**base, "fs_hz": 1000.0, "channels": {"v1": [1.0, 2.0], "i1": [0.0, 1e300]}}
        )


def test_site_limits_only_tighten_and_name_their_path(site_name: str) -> None:
    site = site_with(
        site_name,
        ["a", "b"],
        limits={"voltage_l1": {"min": 180, "max": 260}},
    )
    assert site.limits_of("a") == {M.VOLTAGE_L1: (180.0, 260.0)}
    raw = site.model_dump(mode="json")
    raw["meters"][1]["limits"] = {"voltage_l1": {"max": 250}, "current_l1": {"max": 2e6}}
    with pytest.raises(ConfigError) as err:
        parse_site(raw)
    assert err.value.problems == [
        "meters[1].limits: limits may only tighten the physical bounds: current_l1.max "
        "2e+06 is outside [-1e+06, 1e+06] A"
    ]
    raw["meters"][1]["limits"] = {"voltage_l1": {"max": 250}, "power_factor": {"min": 0.5}}
    site = parse_site(raw)
    assert site.limits_of("b") == {M.VOLTAGE_L1: (180.0, 250.0), M.POWER_FACTOR: (0.5, 1.0)}
    raw["limits"] = {"voltage_l1": {"min": 255}}
    with pytest.raises(ConfigError) as err:
        parse_site(raw)
    assert err.value.problems[0].endswith(
        "meters[1].limits.voltage_l1: min 255 is above max 250 with the site's limits applied"
    )
    raw["limits"] = {"bogus": {"max": 1}, "frequency": {"min": 60, "max": 40}}
    with pytest.raises(ConfigError) as err:
        parse_site(raw)
    text = "\n".join(err.value.problems)
    assert "limits.bogus.[key]" in text
    assert "limits.frequency: min (60) is above max (40)" in text


# -- analytics and archiver over the broker and the database ------------------------------


async def test_bad_seq_and_ts_are_dead_letters_and_the_others_flow(
    settings: Settings, site_name: str
) -> None:
    site = site_with(site_name, ["good"])
    shutdown = Shutdown()
    now = utcnow() - timedelta(seconds=5)
    task = asyncio.create_task(analytics.run(svc(settings, "ana"), site, shutdown))
    try:
        async with (
            listening(
                settings, site_name, topics.deadletter(site_name, "analytics"), DeadLetter, "dl"
            ) as letters,
            listening(
                settings, site_name, topics.pattern(topics.Kind.METRICS, site_name), Metrics, "mt"
            ) as results,
            publisher(settings, site_name) as bus,
        ):
            await shutdown.wait_ready(15)  # analytics subscribed
            bad = {
                "bigseq": payload("bigseq", site_name, 2**64, now),
                "future": payload("future", site_name, 1, "9999-12-31T23:59:59Z"),
                "ancient": payload("ancient", site_name, 1, "0001-01-01T00:00:00Z"),
                "ahead": payload("ahead", site_name, 1, utcnow() + timedelta(hours=1)),
            }
            await bus.publish(topics.reading(site_name, "good"), payload("good", site_name, 1, now))
            for meter, raw in bad.items():
                await bus.publish(topics.reading(site_name, meter), raw)
            later = now + timedelta(seconds=1)
            await bus.publish(
                topics.reading(site_name, "good"), payload("good", site_name, 2, later)
            )
            await letters.get(len(bad), timeout=20)
            await results.wait_for(
                lambda _: {m.source_seq for m in metrics_of(results, "good")} >= {1, 2}, 20
            )
        reasons = {
            topics.parse(d.topic).name: d.reason for d in letters.items if isinstance(d, DeadLetter)
        }
        assert set(reasons) == set(bad)
        assert "seq: Input should be less than or equal to 9223372036854775807" in reasons["bigseq"]
        assert "ts: Input should be less than 2100-01-01" in reasons["future"]
        assert "ts: Input should be greater than or equal to 2000-01-01" in reasons["ancient"]
        assert "s ahead of this receiver's clock" in reasons["ahead"]
        for d in letters.items:
            assert isinstance(d, DeadLetter)
            assert d.payload() == bad[topics.parse(d.topic).name]
        assert not any(metrics_of(results, m) for m in bad)
    finally:
        shutdown.request("test done")
        await asyncio.wait_for(task, 15)


async def test_an_extreme_value_is_refused_and_the_meter_keeps_its_demand(
    settings: Settings, site_name: str, db_schema: str
) -> None:
    """current_l1 = 1e308 -> analytics' dead letter names it; the rest of that reading,
    the meter's next reading (finite demand) and the other meter reach PostgreSQL."""
    dsn = f"{settings.db_dsn}?options=-csearch_path%3D{db_schema}"
    s = settings.model_copy(update={"db_dsn": dsn})
    site = site_with(site_name, ["a", "b"])
    ana, arch = Shutdown(), Shutdown()
    now = utcnow() - timedelta(seconds=10)
    conn = await asyncpg.connect(dsn)
    try:
        async with (
            listening(
                settings, site_name, topics.deadletter(site_name, "analytics"), DeadLetter, "dl"
            ) as letters,
            asyncio.TaskGroup() as tg,
        ):
            tg.create_task(archiver.run(svc(s, "arch"), site, arch))
            tg.create_task(analytics.run(svc(s, "ana"), site, ana))
            await arch.wait_ready(15)  # both subscribed
            await ana.wait_ready(15)
            async with publisher(settings, site_name) as bus:
                for k in range(3):
                    ts = now + timedelta(seconds=k)
                    poison = {"current_l1": 1e308} if k == 0 else {}
                    await bus.publish(
                        topics.reading(site_name, "a"), payload("a", site_name, k + 1, ts, **poison)
                    )
                    await bus.publish(
                        topics.reading(site_name, "b"), payload("b", site_name, k + 1, ts)
                    )
            await letters.get(1, timeout=20)
            rows: list[asyncpg.Record] = []
            for _ in range(200):
                with contextlib.suppress(asyncpg.UndefinedTableError):
                    rows = await conn.fetch(
                        "SELECT meter, source_seq, current_l1, current_l2, apparent_power,"
                        " demand_apparent_power, demand_power, demand_pf FROM pfm_metrics"
                        " WHERE site = $1 AND energy_s IS NOT NULL ORDER BY meter, source_seq",
                        site_name,
                    )
                if len(rows) >= 6:
                    break
                await asyncio.sleep(0.1)
            ana.request("test done")
            arch.request("test done")
        letter = letters.items[0]
        assert isinstance(letter, DeadLetter)
        assert letter.topic == topics.reading(site_name, "a")
        assert "current_l1 = 1e+308: outside the plausible range [-1e+06, 1e+06] A" in (
            letter.reason
        )
        got = {(r["meter"], r["source_seq"]): r for r in rows}
        assert set(got) == {("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("b", 3)}
        assert got[("a", 1)]["current_l1"] is None  # the refused value, absent
        assert got[("a", 1)]["current_l2"] == 10.0  # the rest of that reading
        for row in rows:
            for col in ("apparent_power", "demand_apparent_power", "demand_power", "demand_pf"):
                assert row[col] is not None and math.isfinite(row[col]), (dict(row), col)
        # a's demand window holds what was plausible: S without L1 (4600 VA), then 6900 VA
        assert got[("a", 1)]["apparent_power"] == pytest.approx(4600.0)
        assert got[("a", 3)]["demand_apparent_power"] == pytest.approx((4600.0 + 2 * 6900.0) / 3)
        assert got[("a", 3)]["demand_power"] == pytest.approx((4000.0 + 2 * 6000.0) / 3)
        assert got[("b", 3)]["demand_apparent_power"] == pytest.approx(6900.0)
    finally:
        await conn.close()


async def test_one_poison_input_costs_only_itself(settings: Settings, site_name: str) -> None:
    """Inputs the schema would refuse (built unvalidated here) inside a batch: their own
    results are lost, counted; every other input of the batch is published."""
    site = site_with(site_name, [])
    base = ServiceMetrics("analytics", site_name)
    now = utcnow() - timedelta(seconds=30)
    values = {M(k): v for k, v in GOOD.items()}

    def reading(meter: str, seq: int, ts: datetime) -> Reading:
        return Reading.model_construct(
            site=site_name, meter=meter, ts=ts, seq=seq, profile="x", values=dict(values)
        )

    async with (
        listening(
            settings, site_name, topics.pattern(topics.Kind.METRICS, site_name), Metrics, "mt"
        ) as results,
        Bus(svc(settings, "ana"), service="analytics", site=site_name) as bus,
    ):
        await bus.wait_connected(10)
        app = Analytics(site, bus, AnalyticsMetrics(base))
        incoming: Any = None
        batches = [
            [
                reading("g1", 1, now),
                reading("seq", 1, now),
                reading("year", 1, now),
                reading("g2", 1, now),
            ],
            [
                reading("g1", 2, now + timedelta(seconds=1)),
                reading("seq", 2**64, now + timedelta(seconds=1)),  # no 64-bit integer
                reading("year", 2, datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
                reading("g2", 2, now + timedelta(seconds=1)),
            ],
            [  # year's 3 s and 10 min intervals of 9999-12-31 close: no datetime holds
                # their end, and seq's newest source_seq is still beyond 64 bits
                reading("g1", 3, now + timedelta(seconds=5)),
                reading("seq", 3, now + timedelta(seconds=5)),
                reading("year", 3, now + timedelta(seconds=5)),
                reading("g2", 3, now + timedelta(seconds=5)),
            ],
        ]
        for batch in batches:
            for r in batch:
                await app.on_reading(r, incoming)
            app.flush()
        await results.wait_for(
            lambda _: all(
                {m.source_seq for m in metrics_of(results, g) if not m.aggregate} >= want
                for g, want in (("g1", {1, 2, 3}), ("g2", {1, 2, 3}), ("year", {1, 3}))
            ),
            20,
        )
        await app.drain()

    def published(meter: str) -> set[int | None]:
        return {m.source_seq for m in metrics_of(results, meter) if not m.aggregate}

    assert published("g1") == published("g2") == {1, 2, 3}
    # seq 2**64 cannot be encoded: that message is lost, counted; the meter's next is not
    assert published("seq") == {1, 3}
    lost = base.registry.get_sample_value(
        "pfm_analytics_rejected_total", {"meter": "seq", "kind": "encode"}
    )
    assert lost is not None and lost >= 1 and app.failed_outputs == lost
    # year 9999: its own result is refused downstream; the intervals it opened cannot be
    # closed with a timestamp and are dropped, counted; its next reading is published
    assert published("year") == {1, 3}
    assert app.engine.dropped_aggregates >= 1


# -- the collector over Modbus TCP ---------------------------------------------------------


class FixedSource:
    """A meter that always reads the same values (a stuck register among them)."""

    def __init__(self, values: dict[M, float]) -> None:
        self.values = values

    def sample(self, site: SimSite, t: float, rng: random.Random) -> dict[M, float]:
        return dict(self.values)


async def test_the_collector_drops_an_implausible_register_and_publishes_the_rest(
    settings: Settings, site_name: str
) -> None:
    good = {M(k): v for k, v in GOOD.items()}
    sim = SimSite(seed=1)
    # an f32 register stuck at 3e38 A; voltage L2 above this meter's configured limit
    sim.add_meter(1, "stuck", profile="sdm630", source=FixedSource(good | {M.CURRENT_L1: 3e38}))
    sim.add_meter(2, "fine", profile="sdm630", source=FixedSource(good))
    port = free_port()
    site = parse_site(
        {
            "site": site_name,
            "buses": [{"name": "b1", "host": "127.0.0.1", "port": port}],
            "meters": [
                {
                    "name": "stuck",
                    "bus": "b1",
                    "unit": 1,
                    "profile": "sdm630",
                    "interval_s": 0.1,
                    "limits": {"voltage_l2": {"max": 200}},
                },
                {"name": "fine", "bus": "b1", "unit": 2, "profile": "sdm630", "interval_s": 0.1},
            ],
        }
    )
    metrics = ServiceMetrics("collector", site_name)
    shutdown = Shutdown()
    async with (
        SimServer(sim, port),
        listening(
            settings, site_name, topics.deadletter(site_name, "collector"), DeadLetter, "dl"
        ) as letters,
        listening(
            settings, site_name, topics.pattern(topics.Kind.READING, site_name), Reading, "rd"
        ) as readings,
    ):
        task = asyncio.create_task(
            collector.run(svc(settings, "col"), site, shutdown, metrics=metrics)
        )
        try:
            await readings.wait_for(
                lambda items: (
                    sum(1 for r in items if r.meter == "stuck") >= 10  # type: ignore[attr-defined]
                    and sum(1 for r in items if r.meter == "fine") >= 10
                ),  # type: ignore[attr-defined]
                30,
            )
            await letters.get(2, timeout=10)
        finally:
            shutdown.request("test done")
            await asyncio.wait_for(task, 15)
    stuck = [r for r in readings.items if isinstance(r, Reading) and r.meter == "stuck"]
    fine = [r for r in readings.items if isinstance(r, Reading) and r.meter == "fine"]
    for r in stuck:
        assert M.CURRENT_L1 not in r.values and M.VOLTAGE_L2 not in r.values
        assert r.values[M.CURRENT_L2] == pytest.approx(10.0)
        assert r.values[M.VOLTAGE_L1] == pytest.approx(230.0)
    for r in fine:
        assert r.values[M.CURRENT_L1] == pytest.approx(10.0)
        assert r.values[M.VOLTAGE_L2] == pytest.approx(230.0)
    # one report per measurement while it stays bad (rate limit), every refusal counted
    by_what: dict[str, list[DeadLetter]] = {}
    for d in letters.items:
        assert isinstance(d, DeadLetter)
        by_what.setdefault(orjson.loads(d.payload())["measurement"], []).append(d)
    assert sorted(by_what) == ["current_l1", "voltage_l2"]
    assert all(len(v) == 1 for v in by_what.values())
    current = by_what["current_l1"][0]
    assert current.topic == topics.reading(site_name, "stuck")
    assert current.reason.startswith("meter stuck: current_l1 = 3.0000000")
    assert "outside the plausible range [-1e+06, 1e+06] A" in current.reason
    evidence = orjson.loads(current.payload())
    assert evidence["table"] == "input" and evidence["address"] == 6
    assert len(evidence["registers"]) == 2
    voltage = by_what["voltage_l2"][0]
    assert "voltage_l2 = 230.0" in voltage.reason
    assert "outside the configured limits [0, 200] V" in voltage.reason
    counted = metrics.registry.get_sample_value(
        "pfm_collector_implausible_total", {"meter": "stuck", "measurement": "current_l1"}
    )
    assert counted is not None and counted >= len(stuck)
    assert metrics.registry.get_sample_value(
        "pfm_collector_implausible_total", {"meter": "fine", "measurement": "current_l1"}
    ) in (None, 0.0)
