"""Site file and settings: every bad field listed with its path, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.settings import load_settings
from shared.site import load_site

GOOD = """
site: plant1
buses:
  - {name: b1, kind: tcp, host: 10.0.0.5}
meters:
  - {name: main, bus: b1, unit: 1, profile: pmtr001}
"""

BAD = """
site: Plant 1
thresholds: {pf_alert: 0.9, pf_penalty: 0.95}
buses:
  - {name: b1, kind: tcp}
  - {name: b2, kind: rtu, serial: /dev/ttyUSB0}
meters:
  - {name: main, bus: b1, unit: 0, profile: pmtr001}
  - {name: sub, bus: nope, unit: 250, profile: pmtr001, interval_s: -1}
  - {name: x, bus: b2, unit: 3, profile: pmtr001, colour: red}
"""


def test_a_good_file_loads(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(GOOD)
    site = load_site(f)
    assert site.site == "plant1"
    assert site.bus("b1").port == 502
    assert site.meter("main").interval_s == 1.0


def test_every_bad_field_is_listed_with_its_path(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(BAD)
    with pytest.raises(ConfigError) as info:
        load_site(f)
    text = str(info.value)
    assert str(f) in text
    for expected in (
        "site:",
        "thresholds",
        "buses[0]",
        "meters[0].unit",
        "meters[1].unit",
        "meters[1].interval_s",
        "meters[2].colour",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_cross_references_are_checked(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(GOOD + "  - {name: main, bus: nowhere, unit: 1, profile: pmtr001}\n")
    with pytest.raises(ConfigError) as info:
        load_site(f)
    text = str(info.value)
    assert "meters[1].name: 'main' is used twice" in text
    assert "meters[1].bus: no bus named 'nowhere'" in text


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text("site: a\nmeters: [\n  {name: x\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        load_site(f)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read site file"):
        load_site(tmp_path / "absent.yaml")


def test_bad_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PFM_METRICS_PORT", "99999")
    monkeypatch.setenv("PFM_MQTT_URL", "http://x")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "PFM_METRICS_PORT" in str(info.value)


def _pfmon(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("service", ["collector", "analytics", "actuator", "archiver"])
def test_services_refuse_a_bad_file_with_exit_2(tmp_path: Path, service: str) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(BAD)
    res = _pfmon(service, "--site-file", str(f))
    assert res.returncode == 2, res.stderr
    assert "meters[1].unit" in res.stderr and str(f) in res.stderr


def test_service_without_site_file_says_how_to_give_one() -> None:
    res = _pfmon("collector", env={"PFM_SITE_FILE": ""})
    assert res.returncode == 2
    assert "--site-file" in res.stderr


def test_help_explains_every_command() -> None:
    from typer.main import get_command
    from typer.testing import CliRunner

    from services.cli import app

    res = _pfmon("--help")
    assert res.returncode == 0
    commands = get_command(app).commands  # type: ignore[attr-defined]
    for cmd in ("collector", "analytics", "actuator", "archiver", "demo", "report", "init"):
        assert cmd in commands and cmd in res.stdout
    runner = CliRunner()
    for name, command in commands.items():
        assert (command.help or "").strip(), f"pfmon {name} has no help text"
        sub = runner.invoke(app, [name, "--help"])
        assert sub.exit_code == 0 and "Usage" in sub.output, name
        # a plain flag (--keep, --json, --help) takes no value and must not look as if it did
        assert "<bool>" not in sub.output, f"pfmon {name} --help shows a flag as <bool>"


def test_analytics_options_must_name_a_meter(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(GOOD + "analytics:\n  meters:\n    mian: {pf_mismatch_tolerance: 0.03}\n")
    with pytest.raises(ConfigError) as info:
        load_site(f)
    assert "analytics.meters.mian: no meter named 'mian' (meters: main)" in str(info.value)


TOPOLOGY = """
site: plant1
buses:
  - {name: b1, kind: tcp, host: 10.0.0.5}
meters:
  - {name: main, bus: b1, unit: 1, profile: sdm630, role: billing, ct_ratio: "400/5"}
  - {name: mcc1, bus: b1, unit: 2, profile: pmtr001, parent: main, pt_ratio: "11000/110"}
  - {name: press, bus: b1, unit: 3, profile: pmtr001, role: feeder, parent: mcc1, ct_ratio: 40}
  - {name: pv, bus: b1, unit: 4, profile: pmtr001, role: generation, parent: main}
"""


def test_topology_roles_parents_and_ratios(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(TOPOLOGY)
    site = load_site(f)
    assert [(m.name, m.kind) for m in site.meters] == [
        ("main", "billing"),
        ("mcc1", "feeder"),
        ("press", "feeder"),
        ("pv", "generation"),
    ]
    assert site.meter("main").ct_ratio == 80.0 and site.meter("main").pt_ratio == 1.0
    assert site.meter("mcc1").pt_ratio == 100.0 and site.meter("press").ct_ratio == 40.0
    assert [m.name for m in site.billing_meters()] == ["main"]
    assert [m.name for m in site.children("main")] == ["mcc1", "pv"]
    assert site.billing_point("press") is site.meter("main")
    assert site.meter("pv").exports and not site.meter("press").exports


_PV2 = "  - {name: pv2, bus: b1, unit: 5, profile: pmtr001, role: generation}\n"
_MCC2 = "  - {name: mcc2, bus: b1, unit: 5, profile: pmtr001, parent: press}\n"


@pytest.mark.parametrize(
    ("old", "new", "extra", "expected"),
    [
        ("parent: mcc1, ct", "parent: nope, ct", "", "meters[2].parent: no meter named 'nope'"),
        ("feeder, parent: mcc1", "feeder", "", "meters[2].parent: feeder 'press' needs a parent"),
        ("parent: mcc1, ct", "parent: mcc2, ct", _MCC2, "cycle (press -> mcc2 -> press)"),
        ("ct_ratio: 40", 'ct_ratio: "400/0"', "", "meters[2].ct_ratio: primary and secondary"),
        ("ct_ratio: 40", "ct_ratio: -5", "", "meters[2].ct_ratio: a ratio must be a finite"),
        ("ct_ratio: 40", "ct_ratio: four", "", "meters[2].ct_ratio: not a ratio"),
        ("parent: mcc1, ct", "parent: pv2, ct", _PV2, "feeder 'press' has no billing point"),
    ],
    ids=["unknown-parent", "no-parent", "cycle", "div0", "negative", "text", "no-billing"],
)
def test_topology_errors_name_the_field(
    tmp_path: Path, old: str, new: str, extra: str, expected: str
) -> None:
    assert old in TOPOLOGY
    f = tmp_path / "site.yaml"
    f.write_text(TOPOLOGY.replace(old, new) + extra)
    with pytest.raises(ConfigError) as info:
        load_site(f)
    assert expected in str(info.value), str(info.value)


def test_a_bank_on_a_meter_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(
        TOPOLOGY
        + "devices:\n  - {name: io1, bus: b1, unit: 9, kind: capbank, coils: 8}\n"
        + "banks:\n  - {name: b, meter: mian, device: io1, steps_kvar: [25, 25]}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_site(f)
    assert "banks[0].meter: no meter named 'mian' to compensate" in str(info.value)


def test_a_bad_topology_stops_a_service_with_exit_2(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text(TOPOLOGY.replace("parent: mcc1, ct_ratio: 40", "parent: nope, ct_ratio: 40"))
    res = _pfmon("collector", "--site-file", str(f))
    assert res.returncode == 2, res.stderr
    assert "meters[2].parent: no meter named 'nope'" in res.stderr


def test_console_section_defaults_and_tls_pair() -> None:
    from shared.site import parse_site

    site = parse_site({"site": "s1"})
    assert site.console.open_read is False and site.console.port == 8080
    assert site.console.tls is False
    with pytest.raises(ConfigError) as info:
        parse_site({"site": "s1", "console": {"tls_cert": "/x.pem"}})
    assert "console: tls_cert and tls_key go together" in "\n".join(info.value.problems)
    with pytest.raises(ConfigError) as info:
        parse_site({"site": "s1", "console": {"port": 70000, "open": True}})
    text = "\n".join(info.value.problems)
    assert "console.port" in text and "console.open" in text


def _site_models(model: type, seen: set[type] | None = None) -> set[type]:
    """Every pydantic model reachable from ``model``'s fields (lists, dicts, unions)."""
    from pydantic import BaseModel

    seen = set() if seen is None else seen
    seen.add(model)
    stack = [info.annotation for info in model.model_fields.values()]  # type: ignore[attr-defined]
    while stack:
        tp = stack.pop()
        stack += list(typing.get_args(tp))
        if isinstance(tp, type) and issubclass(tp, BaseModel) and tp not in seen:
            _site_models(tp, seen)
    return seen


def test_no_number_in_the_site_file_may_be_infinite_or_nan() -> None:
    from shared.site import SiteConfig

    models = _site_models(SiteConfig)
    assert len(models) >= 15, models
    lax = sorted(m.__name__ for m in models if m.model_config.get("allow_inf_nan") is not False)
    assert lax == [], f"site-file models that take inf/nan: {lax}"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("thresholds", "nominal_voltage_v"), ".inf"),
        (("thresholds", "voltage_unbalance_pct"), ".nan"),
        (("thresholds", "nominal_voltage_v"), "1e308"),
    ],
)
def test_infinite_huge_or_nan_numbers_are_refused_with_their_path(
    tmp_path: Path, path: tuple[str, str], value: str
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "site: plant1\n"
        "buses: [{name: b1, kind: tcp, host: 10.0.0.5}]\n"
        "meters: [{name: main, bus: b1, unit: 1, profile: pmtr001}]\n"
        f"{path[0]}: {{{path[1]}: {value}}}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_site(site)
    assert ".".join(path) in str(info.value)
