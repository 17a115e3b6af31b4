"""CT and PT ratios: the simulator serves a meter's secondary values over real Modbus
TCP, the collector publishes primary values on the real broker, for every built-in
profile and a user profile; a profile whose device reports primary values is not
scaled twice."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import pytest

from services.collector import profiles as prof
from services.simulator import SimServer, SimSite
from shared.embedded import free_port
from shared.errors import ConfigError
from shared.measurements import Measurement as M
from shared.messages import Reading
from shared.settings import Settings
from shared.site import SiteConfig, parse_site
from shared.site.collector import ProfileSpec
from tests.test_collector import running, sink_for

CT = "400/5"  # 80
PT = "11000/110"  # 100

#: an Acme meter: signed 32-bit holding registers, milli-units, energy u32 low word first
USER_PROFILE: dict[str, Any] = {
    "description": "Acme PM-3",
    "phases": 3,
    "max_gap": 4,
    "registers": {
        "voltage_l1": {"address": 0, "type": "s32", "scale": 0.001},
        "voltage_l2": {"address": 2, "type": "s32", "scale": 0.001},
        "voltage_l3": {"address": 4, "type": "s32", "scale": 0.001},
        "voltage_l1_l2": {"address": 6, "type": "s32", "scale": 0.001},
        "current_l1": {"address": 8, "type": "s32", "scale": 0.001},
        "current_l2": {"address": 10, "type": "s32", "scale": 0.001},
        "current_l3": {"address": 12, "type": "s32", "scale": 0.001},
        "neutral_current": {"address": 14, "type": "s32", "scale": 0.001},
        "power": {"address": 16, "type": "s32", "scale": 0.1},
        "reactive_power": {"address": 18, "type": "s32", "scale": 0.1},
        "apparent_power": {"address": 20, "type": "s32", "scale": 0.1},
        "power_factor": {"address": 22, "type": "s16", "scale": 0.001},
        "frequency": {"address": 23, "type": "u16", "scale": 0.01},
        "thd_current_l1": {"address": 24, "type": "u16", "scale": 0.1},
        "import_energy": {"address": 26, "type": "u32", "word_order": "little"},
        "reactive_energy_ind": {"address": 28, "type": "u32", "word_order": "little"},
    },
}


class Fixed:
    """A simulator source serving fixed secondary values (the energy counters are the
    meter's own, set by the test)."""

    def __init__(self, values: dict[M, float]):
        self.values = values

    def sample(self, site: SimSite, t: float, rng: random.Random) -> dict[M, float]:
        return dict(self.values)


def secondary_values(profile: prof.Profile) -> dict[M, float]:
    """What a meter on the secondary side of 400/5 A CTs and 11 kV/110 V PTs reads:
    63.5 V line to neutral (110 V line to line), 4 A, PF 0.9."""
    v, i, pf = 63.5, 4.0, 0.9
    s = v * i
    by_stem = {
        "voltage": v,
        "current": i,
        "power": s * pf,
        "reactive_power": s * (1 - pf * pf) ** 0.5,
        "apparent_power": s,
        "power_factor": pf,
        "frequency": 50.0,
        "thd_voltage": 2.5,
        "thd_current": 12.0,
    }
    out: dict[M, float] = {}
    for m in profile.registers:
        stem = m.value.rsplit("_l", 1)[0] if m.value[-3:-1] == "_l" else m.value
        if m in (M.VOLTAGE_L1_L2, M.VOLTAGE_L2_L3, M.VOLTAGE_L3_L1):
            out[m] = 110.0
        elif m is M.NEUTRAL_CURRENT:
            out[m] = 0.4
        elif m in (M.SUPPLY_5V, M.SUPPLY_12V):
            out[m] = 5.0 if m is M.SUPPLY_5V else 12.0
        elif m in (M.DEMAND_POWER, M.DEMAND_APPARENT_POWER):
            out[m] = 3 * (by_stem["power"] if m is M.DEMAND_POWER else s)
        elif stem in by_stem:
            three = m.value == stem and stem not in ("power_factor", "frequency")
            out[m] = by_stem[stem] * (3 if three else 1)
    return out


def expected_factor(m: M, ct: float, pt: float) -> float:
    """Derived here from the unit, independently of the vocabulary's table."""
    if m in (M.SUPPLY_5V, M.SUPPLY_12V):
        return 1.0  # the device's own supply rails
    return {"V": pt, "A": ct, "W": ct * pt, "var": ct * pt, "VA": ct * pt}.get(
        m.unit, ct * pt if m.unit in ("Wh", "varh", "VAh") else 1.0
    )


def plant(profile_name: str, user: prof.Profile | None) -> SimSite:
    sim = SimSite(seed=3)
    profile = user or prof.PROFILES[profile_name]
    meter = sim.add_meter(1, "m", profile="sdm630", source=Fixed(secondary_values(profile)))
    meter.profile = profile  # the simulator serves the layout of the profile under test
    # counters far above what a few seconds add (so they read the same within 1e-4)
    meter.energy_wh = [3.0e6, 4.0e6, 5.0e6] if profile.phases == 3 else [1.2e7, 0.0, 0.0]
    meter.q_energy = [2.0e6, 1.0e5]
    return sim


def site_for(
    name: str, port: int, profile_name: str, user: dict[str, Any] | None, ct: object = None
) -> SiteConfig:
    data: dict[str, Any] = {
        "site": name,
        "buses": [{"name": "b1", "host": "127.0.0.1", "port": port}],
        "meters": [
            {
                "name": "m",
                "bus": "b1",
                "unit": 1,
                "profile": profile_name,
                "interval_s": 0.2,
                "ct_ratio": CT if ct is None else ct,
                "pt_ratio": PT,
                "time_sync": False,
            }
        ],
    }
    if user is not None:
        data["profiles"] = {profile_name: user}
    return parse_site(data)


async def first_reading(
    settings: Settings,
    site_name: str,
    profile_name: str,
    user: dict[str, Any] | None,
    ct: object = None,
) -> tuple[Reading, dict[M, float], prof.Profile]:
    """One reading the collector published, and the secondary values the simulated
    meter held (as its registers decode)."""
    spec = ProfileSpec.model_validate(user) if user is not None else None
    profile = prof.from_spec(profile_name, spec) if spec else prof.PROFILES[profile_name]
    sim = plant(profile_name, profile if spec else None)
    port = free_port()
    site = site_for(site_name, port, profile_name, user, ct)
    async with SimServer(sim, port), sink_for(settings, site_name) as sink:
        async with running(settings, site):
            async with asyncio.timeout(15):
                while not sink.readings["m"]:
                    await asyncio.sleep(0.05)
        served = sim.meters[1].values(sim, sim.now())
    secondary = profile.decode(profile.image(served))
    return sink.readings["m"][0], secondary, profile


@pytest.mark.parametrize("profile_name", ["pmtr001", "pzem004t", "sdm630", "acme"])
async def test_collector_publishes_primary_values(
    settings: Settings, site_name: str, profile_name: str
) -> None:
    user = USER_PROFILE if profile_name == "acme" else None
    reading, secondary, _ = await first_reading(settings, site_name, profile_name, user)
    assert set(reading.values) == set(secondary)
    ct, pt = 400 / 5, 11000 / 110
    scaled = {"V": 0, "A": 0, "W": 0, "PF": 0}
    for m, value in reading.values.items():
        factor = expected_factor(m, ct, pt)
        assert value == pytest.approx(secondary[m] * factor, rel=1e-4), m
        if m.unit == "V" and factor != 1:
            scaled["V"] += 1
        elif m.unit == "A":
            scaled["A"] += 1
        elif m.unit in ("W", "Wh"):
            scaled["W"] += 1
        elif m.value.startswith("power_factor"):
            scaled["PF"] += 1
    # every profile has voltages, currents, active power/energy and PF: all were checked
    assert all(scaled.values()), scaled
    if profile_name in ("sdm630", "acme"):
        # the 11 kV switchboard as its primary sees it
        assert reading.values[M.VOLTAGE_L1_L2] == pytest.approx(11000.0, rel=1e-4)
    assert reading.values[M.CURRENT_L1] == pytest.approx(320.0, rel=1e-4)


async def test_a_device_that_reports_primary_values_is_not_scaled_twice(
    settings: Settings, site_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    user = {**USER_PROFILE, "reports_primary": True}
    caplog.set_level(logging.WARNING, logger="services.collector.service")
    reading, secondary, _ = await first_reading(settings, site_name, "acme_ct", user)
    for m, value in reading.values.items():
        assert value == pytest.approx(secondary[m], rel=1e-4), m
    warned = [r.getMessage() for r in caplog.records if "reports primary" in r.getMessage()]
    assert warned and "not applied" in warned[0] and "acme_ct" in warned[0]


def test_ratio_factors_come_from_the_vocabulary() -> None:
    sdm = prof.PROFILES["sdm630"]
    factors = sdm.primary_factors(80.0, 100.0)
    assert factors[M.CURRENT_L1] == 80.0
    assert factors[M.VOLTAGE_L1] == 100.0
    assert factors[M.IMPORT_ENERGY] == factors[M.DEMAND_POWER] == 8000.0
    for never in (M.POWER_FACTOR, M.FREQUENCY, M.THD_CURRENT_L1, M.THD_VOLTAGE_L2):
        assert never not in factors
    assert sdm.primary_factors(1.0, 1.0) == {}


async def test_a_ratio_that_pushes_a_value_past_its_bounds_costs_that_value_only(
    settings: Settings, site_name: str
) -> None:
    """A 1,000,000:1 CT on ~4 A secondary makes ~4,000,000 A, past the physical bound
    of a current (1e6 A): the currents are left out of the reading (a dead letter each),
    and the reading - its voltages, frequency, PF - is published."""
    reading, secondary, _ = await first_reading(settings, site_name, "sdm630", None, ct="1000000/1")
    for m in (M.CURRENT_L1, M.CURRENT_L2, M.CURRENT_L3):
        assert secondary[m] * 1e6 > m.bounds[1]
        assert m not in reading.values, m
    assert reading.values[M.VOLTAGE_L1_L2] == pytest.approx(11000.0, rel=1e-4)
    assert M.FREQUENCY in reading.values and M.POWER_FACTOR_L1 in reading.values
    assert reading.seq >= 1


def test_a_ratio_that_is_no_ct_or_pt_is_refused() -> None:
    for bad in ("1e300", "5/0.000000001", 1e9, "0.00001"):
        with pytest.raises(ConfigError) as err:
            site_for("s", 502, "sdm630", None, ct=bad)
        assert "meters[0].ct_ratio" in str(err.value) and "is not a CT or PT" in str(err.value)
