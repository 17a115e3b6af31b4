"""Alarms that reach people: pfmon's alarm events and Prometheus' rules through a real
Alertmanager (the route tree of deploy/alertmanager/alertmanager.yml) to a webhook and an
SMTP sink, silences from `pfmon alarms`, and Alertmanager outages."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from services.alerts import service as alerts
from services.alerts.alertmanager import Alertmanager
from services.alerts.cli import parse_duration
from services.analytics import service as analytics
from services.cli import app
from services.collector import service as collector
from services.simulator import LoadModel, MeterFleet
from shared import topics
from shared.backoff import Backoff
from shared.bus import Bus
from shared.embedded import free_port
from shared.messages import Event, EventState, Severity, utcnow
from shared.service import Shutdown
from shared.settings import Settings
from shared.site import SiteConfig, parse_site
from tests.alerting_parts import (
    ALERTMANAGER,
    AMTOOL,
    PROMETHEUS,
    REPO,
    AlertmanagerProcess,
    PrometheusProcess,
    SmtpSink,
    Webhook,
    alertmanager_config,
    receivers,
)

needs_am = pytest.mark.skipif(
    ALERTMANAGER is None, reason="prometheus-alertmanager is not installed (apt)"
)


def test_the_example_route_tree_passes_amtool(tmp_path: Path) -> None:
    if AMTOOL is None:
        pytest.skip("amtool is not installed (apt prometheus-alertmanager)")
    res = subprocess.run(
        [AMTOOL, "check-config", str(REPO / "deploy/alertmanager/alertmanager.yml")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "5 inhibit rules" in res.stdout


def test_the_inhibition_covers_every_pf_alarm() -> None:
    """The offline rule silences every PF alarm of the alarm table, no more."""
    import re

    from services.analytics.alarms import ALARMS

    config = yaml.safe_load((REPO / "deploy/alertmanager/alertmanager.yml").read_text())
    offline = next(
        r for r in config["inhibit_rules"] if r["source_matchers"] == ['code="device_offline"']
    )
    pattern = offline["target_matchers"][0].split("=~", 1)[1].strip('"')
    covered = {a.code for a in ALARMS if re.fullmatch(pattern, a.code)}
    assert covered == {a.code for a in ALARMS if "pf" in a.code}


def test_durations() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("4h") == timedelta(hours=4)
    with pytest.raises(ValueError, match=r"expected e\.g\. 30m"):
        parse_duration("4 hours")


# -- helpers ------------------------------------------------------------------------------


def _site(name: str, **extra: Any) -> SiteConfig:
    return parse_site({"site": name, **extra})


def _svc(settings: Settings, name: str, **update: Any) -> Settings:
    return settings.model_copy(
        update={"mqtt_client_id": f"{settings.mqtt_client_id}-{name}", **update}
    )


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def _alertmanager(tmp_path: Path) -> Iterator[tuple[AlertmanagerProcess, Webhook, SmtpSink]]:
    with receivers() as (hook, smtp):
        am = AlertmanagerProcess(tmp_path / "am", alertmanager_config(hook, smtp))
        am.start()
        try:
            yield am, hook, smtp
        finally:
            am.stop()


@contextlib.asynccontextmanager
async def _forwarder(
    settings: Settings, site: SiteConfig, am_url: str, **kw: Any
) -> AsyncIterator[Shutdown]:
    stop = Shutdown()
    s = _svc(settings, "alerts", alertmanager_url=am_url)
    task = asyncio.create_task(alerts.run(s, site, stop, **kw))
    await stop.wait_ready(15)
    try:
        yield stop
    finally:
        stop.request("test done")
        await asyncio.wait_for(task, 15)


class _Events:
    """Publishes alarm events as analytics does."""

    def __init__(self, bus: Bus, site: str) -> None:
        self.bus, self.site, self.seq = bus, site, 0

    async def send(
        self, meter: str, code: str, state: EventState, severity: Severity = Severity.WARNING
    ) -> None:
        self.seq += 1
        ev = Event(
            site=self.site, ts=utcnow(), seq=self.seq, meter=meter, code=code, state=state,
            severity=severity, message=f"{code} on {meter}", evidence={"pf": 0.8},
            service="analytics",
        )  # fmt: skip
        await self.bus.publish(topics.event(self.site, meter), ev)

    async def console(
        self, meter: str, code: str, state: EventState, evidence: dict[str, Any]
    ) -> None:
        """An operator's action as the console publishes it."""
        self.seq += 1
        ev = Event(
            site=self.site, ts=utcnow(), seq=self.seq, meter=meter, code=code, state=state,
            severity=Severity.INFO, message=f"{code} by the console", evidence=evidence,
            service="console",
        )  # fmt: skip
        await self.bus.publish(topics.event(self.site, meter), ev)


@contextlib.asynccontextmanager
async def _publisher(settings: Settings, site: str) -> AsyncIterator[_Events]:
    async with Bus(_svc(settings, "pub"), service="pub", site=site, persistent=False) as bus:
        await bus.wait_connected(10)
        yield _Events(bus, site)


# -- end to end: simulator -> collector -> analytics -> alerts + Prometheus -> Alertmanager


@needs_am
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (apt)")
@pytest.mark.timeout(150)
async def test_an_alarm_of_the_simulator_reaches_people_once(
    settings: Settings, site_name: str, tmp_path: Path
) -> None:
    """A PF below the penalty level in the simulator raises penalty_pf and low_pf: the
    penalty arrives once (webhook and e-mail) although both pfmon alerts and Prometheus'
    rule report it, low_pf is inhibited, and when the PF recovers the resolution arrives."""
    port = free_port()
    load = LoadModel(pf=(0.80, 0.80, 0.80), noise=0.0)
    quick = {"raise_after_s": 0, "clear_after_s": 0}
    site = parse_site(
        {
            "site": site_name,
            "buses": [{"name": "b1", "host": "127.0.0.1", "port": port}],
            "meters": [
                {"name": "main", "bus": "b1", "unit": 1, "profile": "pmtr001", "interval_s": 0.2}
            ],
            "analytics": {
                "average_slots_s": [1],
                "alarm_slot_s": 1,
                "aggregates": False,
                "alarms": {"low_pf": quick, "penalty_pf": quick},
            },
        }
    )
    ana_port = free_port()
    rules = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
    alarm_rules = [
        {**r, "for": "0s"}
        for g in rules["groups"]
        for r in g["rules"]
        if r.get("alert") in ("PfmAlarmActive", "PfmAlarmCritical")
    ]
    with _alertmanager(tmp_path) as (am, hook, smtp):
        prom = PrometheusProcess(
            tmp_path / "prom",
            site_name,
            [f"127.0.0.1:{ana_port}"],
            {"groups": [{"name": "pfm-test", "rules": alarm_rules}]},
            f"127.0.0.1:{am.port}",
        )
        prom.start()
        try:
            col_stop, ana_stop = Shutdown(), Shutdown()
            async with (
                MeterFleet(port, {1: load}),
                _forwarder(settings, site, am.url, resend_s=2),
                asyncio.TaskGroup() as tg,
            ):
                tg.create_task(
                    analytics.run(_svc(settings, "ana", metrics_port=ana_port), site, ana_stop)
                )
                await ana_stop.wait_ready(15)
                tg.create_task(collector.run(_svc(settings, "col"), site, col_stop))
                try:
                    await _until(
                        lambda: bool(hook.alerts("firing", code="penalty_pf", meter="main")),
                        40, "the penalty_pf notification",
                    )  # fmt: skip
                    # Prometheus saw it too (its rule fires), and its copy is held back
                    await _until(
                        lambda: any(
                            a["labels"].get("code") == "penalty_pf" for a in prom.alerts()
                        ),
                        20, "Prometheus' PfmAlarmActive for penalty_pf",
                    )  # fmt: skip
                    client = Alertmanager(am.url)

                    async def prometheus_copy_inhibited() -> bool:
                        got = await client.alerts(['alertname="PfmAlarmActive"'])
                        return any(
                            a["labels"]["code"] == "penalty_pf" and a["status"]["inhibitedBy"]
                            for a in got
                        )

                    for _ in range(100):
                        if await prometheus_copy_inhibited():
                            break
                        await asyncio.sleep(0.2)
                    else:
                        raise AssertionError("Prometheus' copy never reached Alertmanager")
                    await _until(lambda: bool(smtp.messages), 20, "the e-mail")
                    load.pf = (1.0, 1.0, 1.0)  # both PF alarms clear at once
                    await _until(
                        lambda: bool(hook.alerts("resolved", code="penalty_pf", meter="main")),
                        40, "the resolution of penalty_pf",
                    )  # fmt: skip
                    await asyncio.sleep(3)  # anything else would have been sent by now
                finally:
                    col_stop.request("test done")
                    ana_stop.request("test done")
        finally:
            prom.stop()
    firing = hook.alerts("firing", code="penalty_pf")
    assert len(firing) == 1, firing
    assert firing[0]["labels"]["alertname"] == alerts.ALERTNAME
    assert firing[0]["labels"]["site"] == site_name
    assert firing[0]["labels"]["severity"] == "warning"
    assert '"pf":0.8' in firing[0]["annotations"]["evidence"]
    assert not hook.alerts("firing", code="low_pf"), "low_pf is inhibited by penalty_pf"
    assert not hook.alerts(alertname="PfmAlarmActive"), "the Prometheus copy was notified"
    mails = [m for m in smtp.messages if "penalty_pf" in m]
    assert mails and "main" in mails[0]


# -- silences: pfmon alarms ack / shelve / expire / list -----------------------------------


@needs_am
@pytest.mark.timeout(90)
async def test_a_silence_holds_an_alarm_back_until_it_expires(
    settings: Settings, site_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_file = tmp_path / "site.yaml"
    site_file.write_text(f"site: {site_name}\n")
    runner = CliRunner()
    with _alertmanager(tmp_path) as (am, hook, _smtp):
        monkeypatch.setenv("PFM_ALERTMANAGER_URL", am.url)
        monkeypatch.setenv("PFM_SITE_FILE", str(site_file))
        res = await asyncio.to_thread(
            runner.invoke, app, ["alarms", "ack", "m1", "low_pf", "--for", "1h", "--by", "ann"]
        )
        assert res.exit_code == 0, res.output
        silence_id = res.output.split()[1].rstrip(":")
        res = await asyncio.to_thread(
            runner.invoke, app, ["alarms", "shelve", "m2", "--for", "2h", "--comment", "works"]
        )
        assert res.exit_code == 0, res.output
        async with (
            _forwarder(settings, _site(site_name), am.url, resend_s=2),
            _publisher(settings, site_name) as events,
        ):
            await events.send("m1", "low_pf", EventState.RAISED)
            await events.send("m2", "thd_limit", EventState.RAISED)  # maintenance
            await events.send("m1", "unbalance", EventState.RAISED)  # not silenced
            await _until(lambda: bool(hook.alerts(code="unbalance")), 20, "unbalance")
            await asyncio.sleep(3)  # group_wait 2 s: the silenced ones would be here too
            assert not hook.alerts(code="low_pf")
            assert not hook.alerts(meter="m2")
            res = await asyncio.to_thread(runner.invoke, app, ["alarms", "list"])
            assert res.exit_code == 0, res.output
            listed = [line for line in res.output.splitlines() if "low_pf" in line]
            assert listed and f"silenced by {silence_id}" in listed[0], res.output
            assert "acknowledged" in res.output and "maintenance: works" in res.output
            # the acknowledgement ends: the still active alarm is notified
            res = await asyncio.to_thread(runner.invoke, app, ["alarms", "expire", silence_id])
            assert res.exit_code == 0, res.output
            await _until(lambda: bool(hook.alerts("firing", code="low_pf")), 20, "low_pf")
            assert not hook.alerts(meter="m2")


@needs_am
@pytest.mark.timeout(60)
async def test_an_offline_meter_silences_its_pf_alarms(
    settings: Settings, site_name: str, tmp_path: Path
) -> None:
    """The route tree's inhibition: device_offline holds back the same meter's PF alarms,
    not another meter's, and not the meter's other alarms."""
    with _alertmanager(tmp_path) as (am, hook, _smtp):
        async with (
            _forwarder(settings, _site(site_name), am.url, resend_s=2),
            _publisher(settings, site_name) as events,
        ):
            await events.send("m1", "device_offline", EventState.RAISED)
            await _until(lambda: bool(hook.alerts(code="device_offline")), 20, "offline")
            await events.send("m1", "low_pf", EventState.RAISED)
            await events.send("m1", "pf_erratic", EventState.RAISED)
            await events.send("m1", "thd_limit", EventState.RAISED)  # not a PF alarm
            await events.send("m2", "low_pf", EventState.RAISED)  # another meter
            await _until(lambda: bool(hook.alerts(code="thd_limit")), 20, "thd_limit")
            await _until(lambda: bool(hook.alerts(code="low_pf", meter="m2")), 20, "m2 low_pf")
            await asyncio.sleep(3)
    assert not hook.alerts(code="low_pf", meter="m1")
    assert not hook.alerts(code="pf_erratic", meter="m1")


@needs_am
@pytest.mark.timeout(90)
async def test_the_consoles_actions_are_alertmanager_silences(
    settings: Settings, site_name: str, tmp_path: Path
) -> None:
    """The console publishes acknowledgements, shelvings and maintenance as events: they
    become Alertmanager silences (one notion of silence), expire when the alarm clears or
    the maintenance ends, and are never notified as alarms themselves."""
    with _alertmanager(tmp_path) as (am, hook, _smtp):
        client = Alertmanager(am.url)

        async def silences() -> list[dict[str, Any]]:
            return [s for s in await client.silences() if s["status"]["state"] == "active"]

        def matches(s: dict[str, Any]) -> dict[str, str]:
            return {m["name"]: m["value"] for m in s["matchers"]}

        async def wait_silences(n: int) -> list[dict[str, Any]]:
            for _ in range(100):
                got = await silences()
                if len(got) == n:
                    return got
                await asyncio.sleep(0.2)
            raise AssertionError(f"expected {n} active silences, got {await silences()}")

        async with (
            _forwarder(settings, _site(site_name), am.url, resend_s=2),
            _publisher(settings, site_name) as events,
        ):
            await events.send("m1", "low_pf", EventState.RAISED)
            await _until(lambda: bool(hook.alerts("firing", code="low_pf")), 20, "low_pf")
            # the console: ann acknowledges low_pf on m1, bob starts maintenance of m2
            await events.console("m1", "alarm_ack", EventState.NOTICE,
                                 {"code": "low_pf", "phase": None, "user": "ann"})  # fmt: skip
            await events.console("m2", "maintenance", EventState.RAISED,
                                 {"kind": "meter", "user": "bob", "reason": "CT swap"})  # fmt: skip
            got = await wait_silences(2)
            by_meter = {matches(s)["meter"]: s for s in got}
            assert matches(by_meter["m1"]) == {"site": site_name, "meter": "m1", "code": "low_pf"}
            assert by_meter["m1"]["createdBy"] == "ann"
            assert matches(by_meter["m2"]) == {"site": site_name, "meter": "m2"}
            assert "CT swap" in by_meter["m2"]["comment"]
            # in maintenance: m2's alarms are held back, m1's others are not
            await events.send("m2", "thd_limit", EventState.RAISED)
            await events.send("m1", "unbalance", EventState.RAISED)
            await _until(lambda: bool(hook.alerts(code="unbalance")), 20, "unbalance")
            await asyncio.sleep(3)
            assert not hook.alerts(meter="m2")
            # the maintenance ends: its silence expires and m2's active alarm is notified
            await events.console("m2", "maintenance", EventState.CLEARED,
                                 {"kind": "meter", "user": "bob", "reason": ""})  # fmt: skip
            await _until(lambda: bool(hook.alerts("firing", meter="m2")), 20, "m2 after")
            # low_pf clears: its acknowledgement goes with it
            await events.send("m1", "low_pf", EventState.CLEARED)
            await wait_silences(0)
            # a shelving lasts until the time the operator chose
            until = utcnow().timestamp() + 3600
            await events.console("m1", "alarm_shelved", EventState.NOTICE,
                                 {"code": "unbalance", "phase": None, "user": "cy",
                                  "reason": "known", "until": until})  # fmt: skip
            (shelved,) = await wait_silences(1)
            ends = datetime.fromisoformat(shelved["endsAt"].replace("Z", "+00:00"))
            assert abs(ends.timestamp() - until) < 2
        assert not hook.alerts(code="maintenance") and not hook.alerts(code="alarm_ack")


def test_alarms_cli_refuses_bad_input_and_an_absent_alertmanager(
    tmp_path: Path, site_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_file = tmp_path / "site.yaml"
    site_file.write_text(f"site: {site_name}\n")
    monkeypatch.setenv("PFM_SITE_FILE", str(site_file))
    monkeypatch.setenv("PFM_ALERTMANAGER_URL", f"http://127.0.0.1:{free_port()}")
    runner = CliRunner()
    res = runner.invoke(app, ["alarms", "shelve", "m1", "--for", "soon"])
    assert res.exit_code == 2 and "not a duration: 'soon'" in res.output
    res = runner.invoke(app, ["alarms", "ack", "Main Hall", "low_pf"])
    assert res.exit_code == 2 and "is not a slug" in res.output
    res = runner.invoke(app, ["alarms", "list"])
    assert res.exit_code == 1 and "/api/v2/alerts" in res.output


# -- Alertmanager away ---------------------------------------------------------------------


@needs_am
@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_alertmanager_down_for_30_s_loses_nothing(
    settings: Settings, site_name: str, tmp_path: Path
) -> None:
    """Raised before the outage: delivered, cleared during it, the resolution arrives
    after; raised during it: delivered after; and a restart of `pfmon alerts` itself
    during the outage keeps what it had not delivered."""
    site = _site(site_name)
    fast = Backoff(initial_s=0.5, max_s=2.0)
    with _alertmanager(tmp_path) as (am, hook, _smtp):
        async with _publisher(settings, site_name) as events:
            async with _forwarder(settings, site, am.url, resend_s=2, backoff=fast):
                await events.send("m1", "low_pf", EventState.RAISED)
                await _until(lambda: bool(hook.alerts("firing", code="low_pf")), 20, "low_pf")
                am.stop()
                await events.send("m1", "low_pf", EventState.CLEARED)
                await events.send("m1", "broken_neutral", EventState.RAISED, Severity.CRITICAL)
                await asyncio.sleep(15)
            # `pfmon alerts` restarts while Alertmanager is still away
            async with _forwarder(settings, site, am.url, resend_s=2, backoff=fast):
                await asyncio.sleep(15)
                am.start()
                await _until(
                    lambda: bool(hook.alerts("firing", code="broken_neutral")),
                    30, "broken_neutral after the outage",
                )  # fmt: skip
                await _until(
                    lambda: bool(hook.alerts("resolved", code="low_pf")),
                    30, "the resolution of low_pf after the outage",
                )  # fmt: skip
    assert len(hook.alerts("firing", code="low_pf")) == 1
    assert hook.alerts("firing", code="broken_neutral")[0]["labels"]["severity"] == "critical"


def test_the_alerts_metrics_pass_promtool() -> None:
    import shutil

    from shared.metrics import ServiceMetrics

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt prometheus)")
    base = ServiceMetrics(alerts.SERVICE, "s1")
    m = alerts.AlertsMetrics(base)
    m.posts.labels("ok").inc()
    m.events.labels("raised").inc()
    res = subprocess.run(
        [promtool, "check", "metrics"], input=base.exposition(), capture_output=True, timeout=30
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert b"pfm_alerts_active" in base.exposition()
