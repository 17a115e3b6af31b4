"""Relay actions: site checks, ``pfmon rules check``, and the engine's semantics."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from services.actuator.rules import RelayEngine, check_file, check_site, load_actions
from services.cli import app
from shared.errors import ConfigError
from shared.measurements import Measurement as M
from shared.messages import Metrics
from shared.site import load_site, parse_site

pytestmark = pytest.mark.timeout(30)

BASE: dict[str, Any] = {
    "site": "plant",
    "buses": [{"name": "b1", "host": "127.0.0.1", "port": 5020}],
    "meters": [{"name": "main", "bus": "b1", "unit": 1, "profile": "pmtr001"}],
    "devices": [
        {"name": "io1", "bus": "b1", "unit": 10, "coils": 8},
        {"name": "cap1", "bus": "b1", "unit": 11, "kind": "capbank", "coils": 4},
    ],
    "relay_actions": [
        {
            "name": "overvoltage",
            "meter": "main",
            "when": "(L1U > 253) || (L2U > 253) || (L3U > 253)",
            "average": "10s",
            "dry_run": False,
            "recovery": "300s",
            "level": "high",
            "outputs": ["io1:coil:0", "io1:coil:1"],
        }
    ],
    "banks": [{"name": "main", "meter": "main", "device": "cap1", "steps_kvar": "1:1:2:2"}],
}


def site_with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


def action(**changes: Any) -> dict[str, Any]:
    a = copy.deepcopy(BASE["relay_actions"][0])
    a.update(changes)
    return a


def problems_of(data: dict[str, Any], tmp_path: Path) -> list[str]:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return check_file(path)


def test_the_issue_example_is_valid(tmp_path: Path) -> None:
    assert problems_of(BASE, tmp_path) == []
    site = parse_site(BASE)
    a = site.relay_actions[0]
    assert (a.recovery, a.average, a.level, [str(o) for o in a.outputs]) == (
        300.0,
        "10s",
        "high",
        ["io1:coil:0", "io1:coil:1"],
    )
    assert site.banks[0].steps_kvar == [1.0, 1.0, 2.0, 2.0]


def test_relay_actions_have_exactly_the_issue_keys(tmp_path: Path) -> None:
    probs = problems_of(site_with(relay_actions=[action(priority=3)]), tmp_path)
    assert any("relay_actions[0].priority" in p and "Extra inputs" in p for p in probs), probs


def test_two_actions_on_one_output_are_refused_naming_both(tmp_path: Path) -> None:
    data = site_with(
        relay_actions=[
            action(),
            action(name="undervoltage", when="L1U < 207", outputs=["io1:coil:1"]),
        ]
    )
    probs = problems_of(data, tmp_path)
    assert len(probs) == 1, probs
    assert "io1:coil:1" in probs[0]
    assert "'overvoltage'" in probs[0] and "'undervoltage'" in probs[0]
    assert probs[0].startswith("relay_actions[1].outputs[0]")


def test_action_and_bank_on_one_coil_are_refused(tmp_path: Path) -> None:
    data = site_with(relay_actions=[action(outputs=["cap1:coil:2"])])
    probs = problems_of(data, tmp_path)
    assert any("cap1:coil:2" in p and "overvoltage" in p and "bank 'main'" in p for p in probs)


def test_bad_duration_and_level_name_the_key(tmp_path: Path) -> None:
    data = site_with(relay_actions=[action(recovery="five minutes", level="medium")])
    probs = problems_of(data, tmp_path)
    assert any(p.startswith("relay_actions[0].recovery") and "five minutes" in p for p in probs)
    assert any(p.startswith("relay_actions[0].level") and "medium" in p for p in probs)


def test_every_error_is_listed_at_once(tmp_path: Path) -> None:
    """Field errors and expression errors together, each with its path."""
    data = site_with(
        relay_actions=[
            action(recovery="soon"),
            action(name="typo", when="(L1U > 253) || (LII > 10)", outputs=["io1:coil:2"]),
            action(name="paren", when="(L1U > 253))", outputs=["io1:coil:3"]),
            action(name="clash", when="L1U > 1", outputs=["io1:coil:3"]),
        ]
    )
    probs = problems_of(data, tmp_path)
    text = "\n".join(probs)
    assert "relay_actions[0].recovery" in text
    assert "relay_actions[1].when: column 17: unknown token 'LII' (did you mean 'L1I'?)" in text
    assert "relay_actions[2].when: column 12: ')' has no matching '('" in text
    assert "io1:coil:3" in text and "'paren'" in text and "'clash'" in text


def test_references_are_checked(tmp_path: Path) -> None:
    data = site_with(
        relay_actions=[action(meter="nope", average="45s", outputs=["io9:coil:0", "io1:coil:99"])]
    )
    probs = problems_of(data, tmp_path)
    text = "\n".join(probs)
    assert "relay_actions[0].meter: no meter named 'nope'" in text
    assert "relay_actions[0].average: analytics publishes no 45s average" in text
    assert "relay_actions[0].outputs[0]: no device named 'io9'" in text
    assert "relay_actions[0].outputs[1]: coil 99 is beyond the 8 coils of 'io1'" in text


def test_bad_outputs_and_bank_fields(tmp_path: Path) -> None:
    data = site_with(
        relay_actions=[action(outputs=["io1/coil/0"])],
        banks=[
            {
                "name": "main",
                "meter": "main",
                "device": "cap1",
                "steps_kvar": "1:x",
                "reconnect_delay": "0.2s",
            }
        ],
    )
    text = "\n".join(problems_of(data, tmp_path))
    assert "relay_actions[0].outputs[0]" in text and "device:table:address" in text
    assert "steps_kvar" in text


def test_load_actions_raises_config_error_with_every_problem() -> None:
    site = parse_site(site_with(relay_actions=[action(when="LII > 1"), action(name="b", when="(")]))
    with pytest.raises(ConfigError) as info:
        load_actions(site)
    assert len(info.value.problems) == 4  # two bad expressions + two shared outputs
    assert check_site(site) == info.value.problems


def test_cli_rules_check(tmp_path: Path) -> None:
    runner = CliRunner()
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    res = runner.invoke(app, ["rules", "check", str(good)])
    assert res.exit_code == 0, res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            site_with(relay_actions=[action(when="LII > 1"), action(name="x", level="up")])
        )
    )
    res = runner.invoke(app, ["rules", "check", str(bad)])
    assert res.exit_code == 2
    out = res.output
    assert "did you mean 'L1I'" in out
    assert "relay_actions[1].level" in out
    assert "io1:coil:0" in out  # the conflict is listed too
    broken = tmp_path / "broken.yaml"
    broken.write_text("site: [unclosed\n")
    res = runner.invoke(app, ["rules", "check", str(broken)])
    assert res.exit_code == 2 and "not valid YAML" in res.output
    res = runner.invoke(app, ["rules", "check", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "cannot read" in res.output
    # the service refuses to start on the same file, exit 2, every problem listed
    exprbad = tmp_path / "exprbad.yaml"
    exprbad.write_text(yaml.safe_dump(site_with(relay_actions=[action(when="LII > 1 ||")])))
    res = runner.invoke(app, ["actuator", "--site-file", str(exprbad), "--duration", "5"])
    assert res.exit_code == 2, res.output
    assert "did you mean 'L1I'" in res.output


# -- engine --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def metrics(
    t: float, seq: int, v: float, *, avg: float | None = None, energy_wh: float = 0
) -> Metrics:
    values = {
        M.VOLTAGE_L1: v,
        M.VOLTAGE_L2: 230.0,
        M.VOLTAGE_L3: 230.0,
        M.IMPORT_ENERGY_L1: energy_wh,
    }
    a = {k: val for k, val in values.items() if k is not M.IMPORT_ENERGY_L1}
    if avg is not None:
        a[M.VOLTAGE_L1] = avg
    return Metrics(
        site="plant",
        meter="main",
        ts=datetime.fromtimestamp(t, UTC),
        seq=seq,
        interval_s=1,
        values=values,
        averages={"10s": a},
    )


def engine(clock: Clock, **changes: Any) -> RelayEngine:
    site = parse_site(site_with(relay_actions=[action(**changes)]))
    return RelayEngine("plant", load_actions(site), stale_after_s=5.0, clock=clock)


def test_engine_activates_and_recovers_after_the_recovery_time() -> None:
    clock = Clock()
    eng = engine(clock, recovery="30s")
    seq = 0

    def feed(v: float) -> list[tuple[str, int, bool]]:
        nonlocal seq
        clock.t += 1
        seq += 1
        res = eng.on_metrics(metrics(clock.t, seq, v, avg=v))
        return [(i.device, i.address, i.value) for i in res.intents]

    assert feed(240) == []
    assert feed(260) == [("io1", 0, True), ("io1", 1, True)]
    assert feed(261) == []  # already active
    got = [feed(240) for _ in range(29)]
    assert all(g == [] for g in got)  # false for 28 s: not yet
    assert feed(260) == []  # true again: the recovery timer restarts
    outs = [feed(240) for _ in range(31)]
    assert outs[:30] == [[]] * 30
    assert outs[30] == [("io1", 0, False), ("io1", 1, False)]


def test_engine_uses_the_average_slot_and_reasons() -> None:
    clock = Clock()
    eng = engine(clock, recovery="0s")
    clock.t += 1
    # instantaneous spike, average still low: no action
    assert eng.on_metrics(metrics(clock.t, 1, 300, avg=240)).intents == []
    clock.t += 1
    res = eng.on_metrics(metrics(clock.t, 2, 240, avg=255))
    assert res.intents and res.intents[0].origin == "rule:overvoltage"
    assert "overvoltage" in res.intents[0].reason and res.intents[0].trigger["L1U"] == 255


def test_energy_is_read_in_kwh_from_values_never_averaged() -> None:
    clock = Clock()
    eng = engine(clock, when="L1e > 1.5")
    clock.t += 1
    assert eng.on_metrics(metrics(clock.t, 1, 230, energy_wh=1400)).intents == []
    clock.t += 1
    res = eng.on_metrics(metrics(clock.t, 2, 230, energy_wh=1600))
    assert res.intents and res.intents[0].trigger["L1e"] == pytest.approx(1.6)


def test_stale_data_is_never_acted_on() -> None:
    clock = Clock()
    eng = engine(clock)
    clock.t += 100
    res = eng.on_metrics(metrics(clock.t - 10, 1, 300, avg=300))  # 10 s old, limit 5 s
    assert res.intents == []
    assert [e.code for e in res.events] == ["stale_data"]
    assert res.stale_meters == ["main"]
    res = eng.on_metrics(metrics(clock.t - 9, 2, 300, avg=300))
    assert res.events == []  # reported once per episode
    res = eng.on_metrics(metrics(clock.t, 3, 300, avg=300))
    assert len(res.intents) == 2


def test_missing_values_do_not_switch() -> None:
    clock = Clock()
    eng = engine(clock, average="30s")
    clock.t += 1
    res = eng.on_metrics(metrics(clock.t, 1, 300, avg=300))  # no 30s slot in the message
    assert res.intents == []
    assert res.events[0].code == "rule_missing_data" and "L1U" in res.events[0].message


def test_level_low_and_dry_run() -> None:
    clock = Clock()
    eng = engine(clock, level="low", dry_run=True, recovery="0s")
    clock.t += 1
    res = eng.on_metrics(metrics(clock.t, 1, 300, avg=300))
    assert [(i.value, i.dry_run) for i in res.intents] == [(False, True), (False, True)]
    clock.t += 1
    res = eng.on_metrics(metrics(clock.t, 2, 200, avg=200))
    assert [i.value for i in res.intents] == [True, True]


def test_old_or_duplicated_messages_are_ignored() -> None:
    clock = Clock()
    eng = engine(clock, recovery="0s")
    clock.t += 10
    assert eng.on_metrics(metrics(clock.t, 2, 300, avg=300)).intents
    assert eng.on_metrics(metrics(clock.t - 1, 1, 200, avg=200)).intents == []


def test_metrics_that_stop_arriving_are_reported_stale() -> None:
    clock = Clock()
    eng = engine(clock, recovery="0s")
    clock.t += 1
    assert eng.on_metrics(metrics(clock.t, 1, 300, avg=300)).intents
    clock.t += 4
    assert eng.tick().events == []
    clock.t += 2  # 6 s without metrics, limit 5 s
    res = eng.tick()
    assert [e.code for e in res.events] == ["stale_data"] and res.stale_meters == ["main"]
    assert eng.tick().events == []  # once per episode
    assert eng.state["overvoltage"].active  # held, nothing switched


def test_unquoted_step_list_is_explained(tmp_path: Path) -> None:
    """YAML 1.1 turns an unquoted 25:25:25:25 into 5493025: say so, do not just refuse."""
    f = tmp_path / "site.yaml"
    f.write_text(
        "site: s\nbuses: [{name: b, host: 127.0.0.1}]\n"
        "meters: [{name: main, bus: b, unit: 1, profile: pmtr001}]\n"
        "devices: [{name: cap1, bus: b, unit: 2, kind: capbank}]\n"
        "banks: [{name: main, meter: main, device: cap1, steps_kvar: 25:25:25:25}]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_site(f)
    assert "banks[0]" in str(info.value) and "quoted string" in str(info.value)
