"""Durations in the site file: numbers are seconds, texts carry units, bad ones name the field."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from shared.errors import ConfigError
from shared.site import SiteConfig, load_site, parse_site
from shared.site.core import parse_duration

BASE = {
    "site": "plant1",
    "buses": [{"name": "b1", "kind": "tcp", "host": "10.0.0.5"}],
    "meters": [{"name": "main", "bus": "b1", "unit": 1, "profile": "pmtr001"}],
}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (15, 15.0),
        (0.25, 0.25),
        ("15", 15.0),
        ("1000ms", 1.0),
        ("250ms", 0.25),
        ("15s", 15.0),
        ("0.5s", 0.5),
        ("15min", 900.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30min", 5400.0),
        ("1h 30min 15s", 5415.0),
        ("2d", 172800.0),
        (" 10s ", 10.0),
    ],
)
def test_numbers_are_seconds_and_units_convert(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("15 minutes", "'minutes' is not a unit"),
        ("15 minutes", "write 15min"),
        ("15 minute", "write 15min"),
        ("2 hours", "write 2h"),
        ("-1s", "negative"),
        (-1, "negative"),
        ("1e308h", "no exponent"),
        (1e308, "longer than 366 days"),
        (float("inf"), "longer than 366 days"),
        (float("nan"), "not a duration"),
        ("367d", "longer than 366 days"),
        ("１５s", "FULLWIDTH DIGIT ONE"),
        ("15µs", "MICRO SIGN"),
        ("30min1h", "largest first"),
        ("1h1h", "largest first"),
        ("1h30", "30 needs a unit"),
        ("", "empty"),
        ("soon", "not a duration"),
        (True, "not a duration"),
        ([1], "not a duration"),
    ],
)
def test_bad_durations_say_what_is_wrong(text: object, says: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert says in str(info.value)


def _duration_fields(model: type[BaseModel], path: str = "") -> list[str]:
    """Paths of every field of ``model`` (and the models inside it) named ``*_s`` and
    whether its type goes through ``parse_duration``."""
    out = []
    for name, info in model.model_fields.items():
        text = repr(info.annotation) + repr(info.metadata)
        if name.endswith("_s") or "parse_duration" in text or "_whole_seconds" in text:
            takes_units = "parse_duration" in text or "_whole_seconds" in text
            out.append(f"{path}{name}:{'units' if takes_units else 'PLAIN FLOAT'}")
        for arg in [info.annotation, *typing.get_args(info.annotation)]:
            for inner in [arg, *typing.get_args(arg)]:
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    out += _duration_fields(inner, f"{path}{name}.")
    return list(dict.fromkeys(out))


def test_every_seconds_field_of_the_site_file_takes_units() -> None:
    fields = _duration_fields(SiteConfig)
    assert len(fields) >= 20, fields
    plain = [f for f in fields if f.endswith("PLAIN FLOAT")]
    assert plain == [], f"seconds fields that take no units: {plain}"


SITE_WITH_UNITS = """
site: plant1
buses:
  - {name: b1, kind: tcp, host: 10.0.0.5, timeout_s: 1500ms, inter_frame_delay_s: 20ms,
     reprobe_max_s: 2min}
meters:
  - {name: main, bus: b1, unit: 1, profile: pmtr001, interval_s: 500ms, timeout_s: 2s}
devices:
  - {name: io1, bus: b1, unit: 9, poll_s: 1min}
relay_actions:
  - {name: hot, meter: main, when: "L1U > 253", outputs: ["io1:coil:0"], recovery: 1h30min,
     average: 10s}
banks:
  - {name: main, meter: main, device: io1, steps_kvar: [25], coils: [1], min_interval: 15s,
     reconnect_delay: 1min, settle: 2500ms, alarm_delay: 2min, stale_after: 30s}
actuator: {stale_after: 20s, tick: 500ms}
analytics:
  average_slots_s: [5s, 10s, 1min]
  alarm_slot_s: 10s
  demand_window_s: 15min
  batch_window_s: 50ms
  limits: {pf_erratic_window_s: 20s}
  alarms: {low_pf: {raise_after_s: 2min, clear_after_s: 1h}}
archiver:
  flush_interval_s: 500ms
  retry_max_s: 1min
  rollup_interval_s: 10s
  report: {max_gap_s: 5min}
console: {session_ttl: 12h, login_window: 5min}
"""


def test_units_across_the_site_file(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(SITE_WITH_UNITS)
    site = load_site(f)
    bus, meter = site.buses[0], site.meters[0]
    assert (bus.timeout_s, bus.inter_frame_delay_s, bus.reprobe_max_s) == (1.5, 0.02, 120.0)
    assert (meter.interval_s, meter.timeout_s) == (0.5, 2.0)
    assert site.devices[0].poll_s == 60.0
    assert site.relay_actions[0].recovery == 5400.0
    assert site.relay_actions[0].average == "10s"
    bank = site.banks[0]
    assert (bank.min_interval, bank.reconnect_delay, bank.settle) == (15.0, 60.0, 2.5)
    assert (bank.alarm_delay, bank.stale_after) == (120.0, 30.0)
    assert (site.actuator.stale_after, site.actuator.tick) == (20.0, 0.5)
    an = site.analytics
    assert an.average_slots_s == [5, 10, 60] and all(type(s) is int for s in an.average_slots_s)
    assert an.alarm_slot_s == 10 and an.demand_window_s == 900
    assert type(an.demand_window_s) is int
    assert an.batch_window_s == pytest.approx(0.05)
    assert an.limits.pf_erratic_window_s == 20.0
    assert (an.alarms["low_pf"].raise_after_s, an.alarms["low_pf"].clear_after_s) == (120, 3600)
    ar = site.archiver
    assert (ar.flush_interval_s, ar.retry_max_s, ar.rollup_interval_s) == (0.5, 60.0, 10.0)
    assert ar.report.max_gap_s == 300.0
    assert (site.console.session_ttl, site.console.login_window) == (43200.0, 300.0)


def test_plain_numbers_keep_meaning_seconds() -> None:
    data = {**BASE, "meters": [{**BASE["meters"][0], "interval_s": 2, "timeout_s": 0.5}]}  # type: ignore[dict-item]
    site = parse_site(data)
    assert (site.meters[0].interval_s, site.meters[0].timeout_s) == (2.0, 0.5)


def test_bad_durations_name_the_field_and_keep_the_other_problems() -> None:
    data = {
        **BASE,
        "meters": [
            {**BASE["meters"][0], "interval_s": "15 minutes"},  # type: ignore[dict-item]
            {"name": "sub", "bus": "b1", "unit": 2, "profile": "pmtr001", "interval_s": "2h"},
        ],
        "analytics": {"demand_window_s": "90500ms", "average_slots_s": ["5s", "-1s"]},
        "console": {"session_ttl": "１h"},
        "buses": [{"name": "b1", "kind": "tcp", "host": "h", "timeout_s": "1e3s"}],
    }
    with pytest.raises(ConfigError) as info:
        parse_site(data, "site.yaml")
    problems = info.value.problems
    text = "\n".join(problems)
    assert "meters[0].interval_s: '15 minutes' is not a duration" in text
    assert "write 15min" in text
    # within the grammar but beyond the field's own bound: the bound names the field
    assert "meters[1].interval_s: Input should be less than or equal to 3600" in text
    assert "analytics.demand_window_s: '90500ms' is 90.5s: give a whole number" in text
    assert "analytics.average_slots_s[1]: '-1s' is negative" in text
    assert "console.session_ttl: '１h': character 1" in text
    assert "buses[0].timeout_s: '1e3s': a duration has no exponent" in text
    assert len(problems) == 6, problems
