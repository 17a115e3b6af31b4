"""The alarm table (services/analytics/alarms.py) is the one definition every reader uses."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from services.analytics import alarms
from services.analytics.batch import SiteEngine
from shared.errors import ConfigError
from shared.messages import Severity
from shared.site import parse_site

REPO = Path(__file__).resolve().parents[1]


def site(**analytics: object) -> object:
    return parse_site({"site": "s1", "analytics": analytics})


def test_the_docs_table_is_the_alarm_table() -> None:
    text = (REPO / "docs" / "analytics.md").read_text()
    assert alarms.docs_table() in text, "docs/analytics.md: paste alarms.docs_table()"


def test_the_prometheus_rules_split_alarms_by_the_tables_severity() -> None:
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    critical = by_name["PfmAlarmCritical"]
    assert critical["labels"]["severity"] == "critical"
    codes = re.search(r'code=~"([^"]+)"', critical["expr"])
    assert codes and sorted(codes.group(1).split("|")) == sorted(alarms.critical_codes())
    rest = re.search(r'code!~"([^"]+)"', by_name["PfmAlarmActive"]["expr"])
    assert rest and sorted(rest.group(1).split("|")) == sorted(alarms.critical_codes())


def test_codes_are_unique_slugs_with_a_severity() -> None:
    codes = [d.code for d in alarms.ALARMS]
    assert len(codes) == len(set(codes))
    assert all(re.fullmatch(r"[a-z0-9_]+", c) for c in codes)
    assert {d.severity for d in alarms.ALARMS} <= {Severity.WARNING, Severity.CRITICAL}
    assert len(alarms.SLOTS) == sum(3 if d.phased else 1 for d in alarms.PER_METER)


def test_site_timings_override_the_tables_field_by_field() -> None:
    t = alarms.timings(site(alarms={"low_pf": {"raise_after_s": 120}}))  # type: ignore[arg-type]
    assert t["low_pf"].raise_after_s == 120
    assert t["low_pf"].clear_after_s == alarms.BY_CODE["low_pf"].timing.clear_after_s
    assert t["broken_neutral"] == alarms.BY_CODE["broken_neutral"].timing
    with pytest.raises(ConfigError, match=r"analytics.alarms.lowpf: no alarm named 'lowpf'"):
        alarms.timings(site(alarms={"lowpf": {"enabled": False}}))  # type: ignore[arg-type]


def test_the_site_limits_decide_not_fixed_numbers() -> None:
    """The same input raises low_pf at the default 0.97 and not at a site's 0.80."""
    n = 1
    nan3 = np.full((n, 3), np.nan)
    x = alarms.Inputs(
        p=np.array([850.0]), s=np.array([1000.0]), pf_lo=np.array([np.nan]),
        pf_hi=np.array([np.nan]), v=nan3, i=nan3, p_ph=nan3, s_ph=nan3, thd_v=nan3,
        thd_i=nan3, worst_pct=nan3, worst_order=np.zeros((n, 3), dtype=np.int64),
        pf_meter=nan3, pf_calc=nan3, pf_pair=np.zeros((n, 3), dtype=bool),
        u2=np.array([np.nan]), nema=np.zeros(n, dtype=bool), score=np.array([np.nan]),
        u0=np.array([np.nan]), u2_avg=np.array([np.nan]), three=np.zeros(n, dtype=bool),
        export=np.zeros(n, dtype=bool), pf_tolerance=np.array([0.05]),
    )  # fmt: skip
    default = alarms.Limits.of(site())  # type: ignore[arg-type]
    codes = [d.code for d, _, _ in alarms.present(x, default)]
    assert codes == ["low_pf", "penalty_pf"]
    lenient = parse_site({"site": "s1", "thresholds": {"pf_alert": 0.8, "pf_penalty": 0.7}})
    assert alarms.present(x, alarms.Limits.of(lenient)) == []


def test_the_engine_runs_one_state_machine_slot_per_table_slot() -> None:
    engine = SiteEngine(site(alarms={"unbalance": {"enabled": False}}))  # type: ignore[arg-type]
    assert engine.alarms.enabled.shape == (len(alarms.SLOTS),)
    off = [j for j, (d, _) in enumerate(alarms.SLOTS) if d.code == "unbalance"]
    assert not engine.alarms.enabled[off].any() and engine.alarms.enabled.sum() == len(
        alarms.SLOTS
    ) - len(off)
