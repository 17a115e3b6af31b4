"""The capacitor-bank controller against a small plant model, on an accelerated clock.

The plant is a three-phase load (P, inductive Q) with a bank whose connected steps
subtract their kvar from Q. Each simulated second the plant produces one Metrics
message; the controller decides; the ops are applied to the plant and fed back.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from services.actuator.controller import BankController, Decision
from shared.measurements import Measurement as M
from shared.messages import EventState, LoadKind, Metrics
from shared.site.actuator import BankConfig

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def q_for_pf(p_w: float, pf: float) -> float:
    return p_w * math.tan(math.acos(pf))


@dataclass
class Plant:
    """A load and a capacitor bank: Q = Q_load - connected kvar (x actual/nominal)."""

    p_w: float = 40_000.0
    q_load_var: float = field(default_factory=lambda: q_for_pf(40_000.0, 0.78))
    steps_kvar: tuple[float, ...] = (5.0, 5.0, 10.0, 10.0)
    #: real step size / nominal (ageing capacitors)
    actual_ratio: float = 1.0
    coils: dict[int, bool] = field(default_factory=dict)
    thd_i_pct: float = 4.0
    noise_var: float = 0.0
    signed: bool = True  # False: a magnitude-only meter (Q without sign)
    ct_open: bool = False  # the meter's current transformers see nothing
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    seq: int = 0

    def q_var(self) -> float:
        c = sum(
            self.steps_kvar[i] * 1000.0 * self.actual_ratio for i, on in self.coils.items() if on
        )
        return self.q_load_var - c + self.rng.gauss(0, self.noise_var)

    def metrics(self, site: str, meter: str, ts: float) -> Metrics:
        self.seq += 1
        q = 0.0 if self.ct_open else self.q_var()
        p = 0.0 if self.ct_open else self.p_w
        s = math.hypot(p, q)
        i = s / (3 * 230.0)
        values = {
            M.POWER: p,
            M.APPARENT_POWER: s,
            M.POWER_FACTOR: (p / s) if s else 1.0,
            M.CURRENT_L1: i,
            M.CURRENT_L2: i,
            M.CURRENT_L3: i,
            M.THD_CURRENT_L1: self.thd_i_pct,
            M.THD_CURRENT_L2: self.thd_i_pct * 0.9,
            M.THD_CURRENT_L3: self.thd_i_pct * 0.8,
            M.VOLTAGE_L1: 230.0,
        }
        if self.signed:
            values[M.FUND_REACTIVE_POWER] = q
            values[M.REACTIVE_POWER] = q
        else:
            values[M.REACTIVE_POWER] = abs(q)
        load = (
            LoadKind.INDUCTIVE if q > 1 else LoadKind.CAPACITIVE if q < -1 else LoadKind.RESISTIVE
        )
        return Metrics(
            site=site,
            meter=meter,
            ts=datetime.fromtimestamp(ts, UTC),
            seq=self.seq,
            interval_s=1.0,
            values=values,
            averages={"10s": dict(values)},
            load={"total": load},
        )

    @property
    def pf(self) -> float:
        q = self.q_var() if self.noise_var == 0 else self.q_load_var
        return self.p_w / math.hypot(self.p_w, q)


@dataclass
class Run:
    """Drive a controller against a plant; record every operation and alarm."""

    ctl: BankController
    plant: Plant
    clock: FakeClock
    ops: list[tuple[float, int, bool]] = field(default_factory=list)
    events: list[tuple[float, str, EventState]] = field(default_factory=list)
    off_at: dict[int, float] = field(default_factory=dict)
    dry: bool = False

    def apply(self, d: Decision) -> None:
        for op in d.ops:
            now = self.clock.t
            assert op.reason and op.trigger, "every op has a reason and a trigger"
            if op.value:
                # the reconnection delay is never violated
                assert now - self.off_at.get(op.step, -math.inf) >= self.ctl.cfg.reconnect_delay
            else:
                self.off_at[op.step] = now
            self.ops.append((now, op.step, op.value))
            if not self.dry:
                self.plant.coils[op.step] = op.value
            self.ctl.feedback(op.step, op.value)
        for ev in d.events:
            self.events.append((self.clock.t, ev.code, ev.state))

    def step(self, seconds: int = 1, *, ts_lag: float = 0.0) -> None:
        for _ in range(seconds):
            self.clock.t += 1.0
            m = self.plant.metrics("site", "main", self.clock.t - ts_lag)
            self.apply(self.ctl.on_metrics(m))
            self.apply(self.ctl.tick())

    def raised(self, code: str) -> bool:
        return any(c == code and s is EventState.RAISED for _, c, s in self.events)


def make(plant: Plant | None = None, **kw: object) -> Run:
    clock = FakeClock()
    plant = plant or Plant()
    cfg = BankConfig.model_validate(
        {
            "name": "b1",
            "meter": "main",
            "device": "cap1",
            "steps_kvar": list(plant.steps_kvar),
            "min_interval": "10s",
            "reconnect_delay": "60s",
            "alarm_delay": "30s",
            **kw,
        }
    )
    ctl = BankController("site", cfg, clock=clock)
    # the controller starts from what the device shows; steps that are off count as
    # just switched off (discharge), so the first operation waits reconnect_delay
    ctl.adopt({i: plant.coils.get(i, False) for i in range(len(plant.steps_kvar))})
    return Run(ctl, plant, clock)


@pytest.mark.parametrize("program", ["linear", "circular", "optimal"])
def test_reaches_target_then_stays_put(program: str) -> None:
    run = make(program=program)
    assert run.plant.pf == pytest.approx(0.78, abs=0.005)
    # at most n steps, each waits min_interval; the first waits for the start-up discharge
    budget = 60 + 10 * len(run.plant.steps_kvar) + 5
    run.step(budget)
    assert run.plant.pf >= run.ctl.cfg.target_pf, (program, run.plant.pf, run.ops)
    settled = len(run.ops)
    assert settled >= 1
    # constant load: no further operation for 10 simulated minutes
    run.step(600)
    assert len(run.ops) == settled, run.ops[settled:]
    assert not run.raised("undercompensated")
    assert sum(run.ctl.operations) == settled


def test_noisy_constant_load_does_not_hunt() -> None:
    run = make(Plant(noise_var=300.0))
    run.step(200)
    settled = len(run.ops)
    run.step(600)
    assert len(run.ops) == settled


def test_fluctuating_load_never_violates_reconnection_or_min_interval() -> None:
    rng = random.Random(3)
    run = make(program="circular", min_interval="5s", reconnect_delay="45s")
    for _ in range(240):  # 4 simulated hours in 60 s chunks
        run.plant.p_w = rng.uniform(5_000, 60_000)
        run.plant.q_load_var = run.plant.p_w * math.tan(math.acos(rng.uniform(0.6, 0.99)))
        run.step(60)
    assert len(run.ops) > 50
    times = [t for t, _, _ in run.ops]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 5.0
    # checked op by op in Run.apply; check the log once more independently
    last_off: dict[int, float] = {}
    for t, step, value in run.ops:
        if value:
            assert t - last_off.get(step, -1e9) >= 45.0
        else:
            last_off[step] = t
    counts = [sum(1 for _, s, _ in run.ops if s == i) for i in range(4)]
    assert counts == run.ctl.operations
    # circular shares the wear between equal steps
    assert abs(counts[0] - counts[1]) <= max(4, counts[0] // 3)


def test_linear_switches_in_order_and_out_in_reverse() -> None:
    run = make(Plant(steps_kvar=(4.0, 4.0, 4.0, 4.0)), program="linear")
    run.step(150)
    ins = [s for _, s, v in run.ops if v]
    assert ins == sorted(ins) and ins[0] == 0
    run.plant.q_load_var = 2_000.0  # the load drops: steps go out, last in first out
    run.step(100)
    outs = [s for _, s, v in run.ops if not v]
    assert outs and outs == sorted(outs, reverse=True)


def test_optimal_picks_the_best_combination_in_few_operations() -> None:
    # 31 kvar demand with 1:2:4:8:16 steps of 1 kvar: 1+2+4+8+16
    plant = Plant(
        steps_kvar=(1.0, 2.0, 4.0, 8.0, 16.0), q_load_var=21_000.0 + q_for_pf(40_000, 0.97)
    )
    run = make(plant, program="optimal")
    run.step(200)
    assert {s for _, s, v in run.ops if v} == {0, 2, 4}  # 1 + 4 + 16 = 21
    assert len(run.ops) == 3


def test_capacitive_load_gets_no_capacitors_and_overcompensation_alarm() -> None:
    plant = Plant(q_load_var=-5_000.0)
    run = make(plant, alarm_delay="0s")
    run.step(200)
    assert [v for _, _, v in run.ops if v] == []
    # steps in while leading (forced by hand) -> alarm, and the controller takes them out
    plant.coils = {0: True, 1: True}
    run.ctl.adopt({0: True, 1: True, 2: False, 3: False})
    run.step(100)
    assert run.raised("overcompensated")
    assert not any(plant.coils.values())
    assert run.ctl.alarms["overcompensated"] is False  # cleared once the steps are out


def test_export_quadrant_uses_absolute_p() -> None:
    plant = Plant(p_w=-30_000.0, q_load_var=q_for_pf(30_000, 0.8))
    run = make(plant)
    run.step(200)
    assert abs(plant.p_w) / math.hypot(plant.p_w, plant.q_var()) >= 0.97


def test_thd_block_takes_steps_out_and_names_the_resonance_order() -> None:
    run = make(short_circuit_kva=5000.0, thd_limit_pct=15.0)
    run.step(150)
    assert any(run.plant.coils.values())
    kvar_in = run.ctl.kvar_in
    run.plant.thd_i_pct = 25.0
    ops_before = len(run.ops)
    run.step(1)
    ev = [e for e in run.events if e[1] == "thd_block"]
    assert ev and ev[-1][2] is EventState.RAISED
    assert not any(run.plant.coils.values())
    assert all(not v for _, _, v in run.ops[ops_before:])
    # evidence: resonance order sqrt(Ssc/Qc) with the kvar that was in
    d = run.ctl.on_metrics(run.plant.metrics("site", "main", run.clock.t + 0.5))
    run.clock.t += 1
    assert d.ops == []
    run.step(300)  # blocked: nothing switches in
    assert not any(run.plant.coils.values())
    assert run.ctl.alarms["thd_block"]
    # the message of the raised event carries the order for the kvar that was connected
    ctl2 = make(short_circuit_kva=5000.0, thd_limit_pct=15.0)
    ctl2.step(150)
    ctl2.plant.thd_i_pct = 30.0
    dec = ctl2.ctl.on_metrics(ctl2.plant.metrics("site", "main", ctl2.clock.t + 1))
    raised = next(e for e in dec.events if e.code == "thd_block")
    expected = math.sqrt(5000.0 / ctl2.ctl.kvar_in)
    assert raised.evidence["resonance_order"] == pytest.approx(expected, abs=0.01)
    assert f"{expected:.2f}" in raised.message
    assert kvar_in > 0
    # THD back below 90 % of the limit: cleared, regulation resumes
    run.plant.thd_i_pct = 5.0
    run.step(200)
    assert not run.ctl.alarms["thd_block"]
    assert run.plant.pf >= 0.97


def test_stale_data_holds_or_disconnects() -> None:
    run = make()
    run.step(150)
    n = len(run.ops)
    assert any(run.plant.coils.values())
    run.step(60, ts_lag=30.0)  # metrics arrive but are 30 s old (limit 15 s)
    assert len(run.ops) == n
    assert run.raised("stale_data")
    run.step(5)  # fresh again: cleared
    assert run.ctl.alarms["stale_data"] is False

    run2 = make(on_stale="disconnect")
    run2.step(150)
    assert any(run2.plant.coils.values())
    for _ in range(30):  # metrics stop arriving altogether; only the tick runs
        run2.clock.t += 1
        run2.apply(run2.ctl.tick())
    assert run2.raised("stale_data")
    assert not any(run2.plant.coils.values())


def test_no_current_disconnects() -> None:
    run = make()
    run.step(150)
    run.plant.ct_open = True
    run.step(2)
    assert run.raised("no_current")
    assert not any(run.plant.coils.values())


def test_undercompensated_alarm_when_all_steps_in() -> None:
    run = make(Plant(q_load_var=q_for_pf(40_000, 0.6)))
    run.step(200)
    assert all(run.plant.coils.get(i) for i in range(4))
    assert run.raised("undercompensated")


def test_learns_step_sizes_from_delta_q() -> None:
    plant = Plant(actual_ratio=0.8, steps_kvar=(5.0, 5.0, 10.0, 10.0))
    run = make(plant, learn_steps=True, settle="2s")
    run.step(200)
    learned = [run.ctl.size_var[i] / 1000 for i in range(4) if plant.coils.get(i)]
    nominal = [plant.steps_kvar[i] for i in range(4) if plant.coils.get(i)]
    assert learned
    for got, nom in zip(learned, nominal, strict=True):
        # one EMA update from nominal toward 0.8 x nominal
        assert got == pytest.approx(0.9 * nom, rel=0.02)


def test_magnitude_only_meter_takes_the_sign_from_load() -> None:
    run = make(Plant(signed=False))
    run.step(150)
    assert run.plant.pf >= 0.97


def test_operation_limit_locks_a_step() -> None:
    run = make(Plant(steps_kvar=(10.0, 10.0)), operation_limit=2, program="linear")
    run.ctl.operations[0] = 2  # step 1 worn out
    run.step(200)
    assert 0 not in {s for _, s, _ in run.ops}
    assert run.raised("operation_limit")
    assert run.ctl.alarms["operation_limit:1"] and not run.ctl.alarms["operation_limit:2"]


def test_dry_run_drives_nothing_but_reports() -> None:
    run = make(dry_run=True)
    run.dry = True
    run.step(150)
    assert run.ops  # what it would have done
    assert not any(run.plant.coils.values())


def test_equal_steps_are_switched_from_step_1_upwards() -> None:
    """With steps of equal size the optimal program takes the lowest-numbered free step,
    so an operator watching the bank sees step 1, then 2 ... (not step 2 first)."""
    plant = Plant(steps_kvar=(5.0,) * 6, q_load_var=q_for_pf(40_000.0, 0.78))
    run = make(plant)
    run.step(200)
    ins = [step for _, step, on in run.ops if on]
    assert ins, "the bank switched nothing"
    assert ins == sorted(ins) and ins[0] == 0, ins


def test_manual_mode_holds_the_controller_and_hand_switching_keeps_the_interlocks() -> None:
    run = make(operation_limit=3)
    run.ctl.mode = "manual"
    run.step(200)  # PF 0.78 for minutes: in manual mode the controller switches nothing
    assert run.ops == []
    op = run.ctl.manual_step(0, True, "ann")
    assert not isinstance(op, str), op
    assert "by hand (ann)" in op.reason and op.trigger["user"] == "ann"
    run.apply(Decision(ops=[op]))
    assert run.plant.coils[0] is True
    assert "at most every 10s" in str(run.ctl.manual_step(1, True, "ann"))  # min_interval
    run.clock.t += 10
    op = run.ctl.manual_step(0, False, "ann")
    assert not isinstance(op, str)
    run.ctl.feedback(0, False)
    run.clock.t += 10
    refused = run.ctl.manual_step(0, True, "ann")
    assert isinstance(refused, str) and "discharging (50.0s left of 60s" in refused
    assert "already out" in str(run.ctl.manual_step(1, False, "ann"))
    assert "steps 1..4, not 9" in str(run.ctl.manual_step(8, True, "ann"))
    run.ctl.operations[2] = 3
    assert "operation limit" in str(run.ctl.manual_step(2, True, "ann"))
    run.ctl.mode = "maintenance"
    assert "maintenance mode" in str(run.ctl.manual_step(1, True, "ann"))
    run.ctl.mode = "auto"
    assert "auto mode: switch it to manual first" in str(run.ctl.manual_step(1, True, "ann"))
    run.step(120)  # back to automatic: the controller regulates again
    assert run.ops and run.plant.pf >= 0.9
