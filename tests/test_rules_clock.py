"""Relay actions that read the clock: hour, minute, weekday, month in the site's time zone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from typer.testing import CliRunner

from services.actuator.expr import ExprError, parse
from services.actuator.pmtr import UploadError, encode
from services.actuator.rules import RelayEngine, check_file, check_site, load_actions
from services.cli import app
from shared.errors import ConfigError
from shared.measurements import Measurement as M
from shared.messages import Metrics
from shared.settings import Settings
from shared.site import parse_site
from shared.site.actuator import RelayAction
from tests.test_actuator_outputs import CoilServer
from tests.test_actuator_service import Harness, coil_server, service, site, wait_online
from tests.test_actuator_service import metrics as service_metrics

pytestmark = pytest.mark.timeout(30)
__all__ = ["coil_server"]  # the fixture, imported for the service test

BERLIN = "Europe/Berlin"


def site_data(when: str, timezone: str | None = BERLIN, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "site": "plant",
        "buses": [{"name": "b1", "host": "127.0.0.1", "port": 5020}],
        "meters": [
            {"name": "main", "bus": "b1", "unit": 1, "profile": "sdm630"},
            {"name": "pm", "bus": "b1", "unit": 2, "profile": "pmtr001"},
        ],
        "devices": [
            {"name": "io1", "bus": "b1", "unit": 10, "coils": 8},
            {"name": "pm", "bus": "b1", "unit": 2, "kind": "pmtr001"},
        ],
        "relay_actions": [
            {"name": "night", "meter": "main", "when": when, "outputs": ["io1:coil:0"]}
        ],
        **extra,
    }
    if timezone is not None:
        data["timezone"] = timezone
    return data


# -- the language ---------------------------------------------------------------------------


def test_clock_tokens_parse_and_combine_with_measurements() -> None:
    expr = parse("hour >= 22 && L1P > 5000")
    assert expr.names == ("hour", "L1P")
    assert expr.clock_names == ("hour",)
    env = {"hour": 23.0, "L1P": 6000.0}
    assert expr.evaluate(env) is True
    assert expr.evaluate({**env, "hour": 21.0}) is False
    minutes = parse("hour * 60 + minute >= 22 * 60 + 30 || weekday >= 6 || month == 12")
    assert set(minutes.clock_names) == {"hour", "minute", "weekday", "month"}
    assert parse("L1U > 253").clock_names == ()


@pytest.mark.parametrize(("text", "near"), [("Hour > 2", "hour"), ("weekdy == 1", "weekday")])
def test_a_misspelt_clock_token_gets_the_nearest_one(text: str, near: str) -> None:
    with pytest.raises(ExprError) as info:
        parse(text)
    assert f"did you mean {near!r}" in str(info.value) and info.value.column == 1


@pytest.mark.parametrize(
    ("text", "column", "says"),
    [
        ("weekday == 0", 12, "weekday is never 0: it is the day of the week, 1 = Monday"),
        ("hour >= 24 && L1P > 0", 9, "hour is never 24: it is the hour of the day, 0-23"),
        ("month == 13", 10, "month is never 13"),
        ("minute > -1", 11, "minute is never -1"),
        ("60 == minute", 1, "minute is never 60"),
        ("hour >= 22.5", 9, "hour is a whole number (hour of the day, 0-23)"),
    ],
)
def test_a_clock_token_against_a_number_it_never_takes_is_refused(
    text: str, column: int, says: str
) -> None:
    with pytest.raises(ExprError) as info:
        parse(text)
    assert says in info.value.message and info.value.column == column


# -- the site file ------------------------------------------------------------------------------


def test_a_clock_rule_needs_the_sites_timezone() -> None:
    problems = check_site(parse_site(site_data("hour >= 22 && L1P > 5000", timezone=None)))
    assert problems == [
        "relay_actions[0].when: reads the clock (hour) but the site file has no timezone: - "
        "add one at the top level (an IANA name, e.g. timezone: Europe/Berlin, or timezone: UTC)"
    ]
    assert check_site(parse_site(site_data("hour >= 22 && L1P > 5000"))) == []
    assert check_site(parse_site(site_data("hour >= 22", timezone="UTC"))) == []
    # a rule without clock tokens needs no time zone
    assert check_site(parse_site(site_data("L1P > 5000", timezone=None))) == []
    with pytest.raises(ConfigError) as info:
        load_actions(parse_site(site_data("weekday == 7", timezone=None)))
    assert "reads the clock (weekday)" in "\n".join(info.value.problems)


@pytest.mark.parametrize(
    ("zone", "says"),
    [
        ("Europe/Berln", "'Europe/Berln' is not a known time zone (did you mean 'Europe/Berlin'?)"),
        ("europe/berlin", "did you mean 'Europe/Berlin'?"),
        ("CEST", "'CEST' is not a known time zone"),
        ("Mars/Olympus_Mons", "is not a known time zone: write an IANA time zone name"),
        ("../../etc/passwd", "is not a known time zone"),
        ("localtime", "this machine's setting, not a place"),
        ("Europe/Berlin ", "is not a known time zone"),
        ("Europe/Bérlin", "(LATIN SMALL LETTER E WITH ACUTE) is not in a time zone name"),
        ("", "is not a time zone"),
        (2, "is not a time zone"),
    ],
)
def test_a_bad_timezone_is_refused_naming_the_field(zone: object, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_site(site_data("hour >= 22", timezone=zone), "site.yaml")  # type: ignore[arg-type]
    (problem,) = info.value.problems
    assert problem.startswith("timezone: ") and says in problem, problem


def test_the_zone_is_the_sites() -> None:
    assert parse_site(site_data("hour > 1")).zone == ZoneInfo(BERLIN)
    assert parse_site(site_data("L1U > 1", timezone=None)).zone == ZoneInfo("UTC")


# -- PMTR_001: no clock on the firmware ------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "column"),
    [
        ("hour >= 22 && L1P > 5000", 1),
        ("L1P > 5000 && weekday >= 6", 15),
        ("hour * 60 + minute > 1350", 1),
        ("!(month == 12)", 3),
    ],
)
def test_a_clock_action_is_never_uploaded_to_a_pmtr001(when: str, column: int) -> None:
    action = RelayAction.model_validate(
        {"name": "night", "meter": "pm", "when": when, "outputs": ["pm:pin:4"]}
    )
    with pytest.raises(UploadError) as info:
        encode(action, 0)
    text = str(info.value)
    assert f"when: column {column}: the PMTR_001 firmware has no clock tokens" in text
    assert "arithmetic" not in text  # the reason is the clock, not what follows from it


def test_rules_check_refuses_a_clock_action_on_pmtr_pins(tmp_path: Path) -> None:
    data = site_data("hour >= 22 && L1P > 5000")
    data["relay_actions"][0].update(meter="pm", outputs=["pm:pin:4"])
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    problems = check_file(path)
    assert problems == [
        "relay_actions[0]: cannot upload to PMTR_001 'pm': relay action 'night': when: "
        "column 1: the PMTR_001 firmware has no clock tokens (hour): an action that reads "
        "the time cannot run on the meter; let the gateway drive a coil device instead"
    ]
    res = CliRunner().invoke(app, ["rules", "check", str(path)])
    assert res.exit_code == 2 and "no clock tokens" in res.output
    # the same formula on a coil device is fine
    data["relay_actions"][0].update(meter="main", outputs=["io1:coil:0"])
    path.write_text(yaml.safe_dump(data))
    assert check_file(path) == []


# -- the engine: the message's time, in the site's zone ----------------------------------------


class Clock:
    """The process's clock, kept a second after each message (fresh data, any date)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def reading(ts: datetime, seq: int, power: float = 6000.0) -> Metrics:
    return Metrics(
        site="plant",
        meter="main",
        ts=ts,
        seq=seq,
        interval_s=1,
        values={M.POWER_L1: power},
        averages={},
    )


def run_engine(when: str, zone: str, stamps: list[datetime]) -> list[bool]:
    """Whether the action is active after each message, fed at those acquisition times."""
    site = parse_site(site_data(when, timezone=zone))
    clock = Clock()
    eng = RelayEngine("plant", load_actions(site), stale_after_s=5.0, clock=clock, zone=site.zone)
    out = []
    for seq, ts in enumerate(stamps, 1):
        clock.t = ts.timestamp() + 1.0
        eng.on_metrics(reading(ts, seq))
        out.append(eng.state["night"].active)
    return out


def test_spring_forward_in_berlin() -> None:
    # 2026-03-29 (a Sunday): 02:00 CET jumps to 03:00 CEST, at 01:00 UTC
    before = datetime(2026, 3, 29, 0, 59, 59, tzinfo=UTC)  # 01:59:59 CET
    after = datetime(2026, 3, 29, 1, 0, 0, tzinfo=UTC)  # 03:00:00 CEST
    assert run_engine("hour >= 3 && L1P > 5000", BERLIN, [before, after]) == [False, True]
    # the same instants read in UTC are hours 0 and 1
    assert run_engine("hour >= 3 && L1P > 5000", "UTC", [before, after]) == [False, False]
    # 02:xx does not exist in Berlin that night: a rule for it never fires
    night = [before + timedelta(minutes=m) for m in range(-120, 121, 5)]
    assert not any(run_engine("hour == 2", BERLIN, night))
    assert any(run_engine("hour == 2", "UTC", night))
    assert run_engine("weekday == 7 && month == 3 && minute == 0", BERLIN, [after]) == [True]


def test_fall_back_in_berlin_repeats_hour_two() -> None:
    # 2026-10-25: 03:00 CEST goes back to 02:00 CET at 01:00 UTC; 02:xx happens twice
    first = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST
    second = datetime(2026, 10, 25, 1, 30, tzinfo=UTC)  # 02:30 CET
    between = datetime(2026, 10, 25, 0, 59, 59, tzinfo=UTC)  # 02:59:59 CEST
    later = datetime(2026, 10, 25, 2, 0, tzinfo=UTC)  # 03:00 CET
    assert run_engine("hour == 2 && minute == 30", BERLIN, [first]) == [True]
    assert run_engine("hour == 2 && minute == 30", BERLIN, [second]) == [True]
    assert run_engine("hour == 2", BERLIN, [first, between, second, later]) == [
        True,
        True,
        True,
        False,
    ]


def test_the_decision_follows_the_messages_time_not_the_process_clock() -> None:
    # a replay: the same messages give the same decisions whatever day the process runs
    stamps = [datetime(2026, 1, 5, h, 0, tzinfo=UTC) for h in (20, 21, 22, 23)]  # Monday
    once = run_engine("hour >= 22 && weekday == 1", BERLIN, stamps)
    # 21:00 UTC is 22:00 CET; 23:00 UTC is already Tuesday 00:00 in Berlin
    assert once == [False, True, True, False]
    assert run_engine("hour >= 22 && weekday == 1", BERLIN, stamps) == once
    # Berlin's Monday 22:00 is still Monday; Auckland's is already Tuesday
    assert run_engine("weekday == 2", "Pacific/Auckland", stamps) == [True, True, True, True]


def test_the_trigger_says_what_the_clock_read() -> None:
    site = parse_site(site_data("hour >= 22 && L1P > 5000"))
    clock = Clock()
    eng = RelayEngine("plant", load_actions(site), stale_after_s=5.0, clock=clock, zone=site.zone)
    ts = datetime(2026, 7, 1, 20, 15, tzinfo=UTC)  # 22:15 CEST
    clock.t = ts.timestamp()
    (intent,) = eng.on_metrics(reading(ts, 1)).intents
    assert intent.trigger["hour"] == 22.0 and intent.trigger["L1P"] == 6000.0
    assert "hour >= 22" in intent.reason


# -- the service, over Mosquitto and Modbus TCP ------------------------------------------------


async def test_the_service_reads_the_clock_in_the_sites_zone(
    settings: Settings, site_name: str, coil_server: CoilServer
) -> None:
    cs = coil_server
    ts = datetime.now(UTC).replace(microsecond=0)
    kolkata = ts.astimezone(ZoneInfo("Asia/Kolkata"))  # UTC+05:30: never UTC's hour
    when = f"hour == {kolkata.hour} && minute == {kolkata.minute} && L1U > 253"
    base = site(site_name, cs.port, when=when).model_dump(mode="json")
    for a in base["relay_actions"]:
        a["outputs"] = [f"{o['device']}:{o['table']}:{o['address']}" for o in a["outputs"]]
    in_utc = parse_site(base)
    async with Harness(settings, site_name, cs) as h:
        with pytest.raises(ConfigError, match="no timezone"):
            async with service(settings, in_utc):
                pass
        async with service(settings, parse_site({**base, "timezone": "Asia/Kolkata"})) as svc:
            await wait_online(h)
            await svc.wait_ready(10)
            await h.send(service_metrics(site_name, 1, 260.0, ts))
            await h.until(lambda: cs.coils[0] and cs.coils[1])
            await h.until(lambda: len(h.commands) == 2)
            assert h.commands[0].trigger["hour"] == kolkata.hour
