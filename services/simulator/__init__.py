"""The plant simulator: a physical model of a site served as Modbus TCP devices.

Everyone uses it: ``pfmon simulate``, ``pfmon demo``, the tests, the benchmarks and
the actuator's closed-loop test. It is a model, not random numbers: a three-phase
supply with a small unbalance and noise feeds loads (induction motors with inrush,
slightly capacitive harmonic-rich server PSUs, VFDs with 5th/7th harmonics,
resistive heaters); meters measure the sum of the loads downstream of them; a
**capacitor bank** (coils = steps) and a **relay I/O** module (coils switch loads)
are Modbus devices whose state feeds back into what the meters read, so a
controller can close the loop. Faults can be injected on command or on a schedule.
Reproducible: every random draw comes from ``random.Random(seed)``.

Python API (stable; the actuator's tests build on it)::

    from services.simulator import (
        SimSite, SimServer, Motor, Heater, ServerPSU, VFD, inductive_site)

    # a ready-made inductive plant: main meter PF ~0.78, a 6 x 25 kvar bank
    site = inductive_site(seed=1)            # meter "main" unit 1 (sdm630), bank unit
                                             # 10, relays unit 11; see its docstring
    # or build one yourself:
    site = SimSite(seed=1)
    site.add_load(Motor("compressor", kw=90, pf=0.78))
    site.add_load(Heater("oven", kw=30), running=False)
    site.add_meter(1, "main", profile="pmtr001")            # sees every load + the bank
    site.add_meter(2, "hvac", profile="sdm630", loads=["compressor"], bank=False)
    site.add_bank(10, steps=6, kvar_per_step=25.0, discharge_s=0.0)  # coils 0..5
    site.add_relays(11, coils=8, switches={0: "oven"})      # coil 0 runs the oven

    async with SimServer(site, port) as server:             # 127.0.0.1:port, all units
        state = site.state()             # PlantState: p_w, q_var, s_va, pf, bank_steps,
                                         # bank_kvar, meters={"main": MeterState...}
        site.set_load("compressor", kw=120)                 # change the load
        site.set_load("oven", running=True)
        site.inject("comm_loss", unit=2)                    # faults, see FAULTS
        site.clear(unit=2)
        site.bank.set_steps([0, 1])                         # or write coils over Modbus

Bank device (its own unit id): coils ``0..steps-1`` = steps (1 = in service);
holding 0 = number of steps, holding ``1+i`` = kvar of step i in 0.1 kvar.
Switched kvar is Q = -kvar * (V/Vn)^2, shared over the three phases, and is seen
by every meter created with ``bank=True`` (the default). ``bank.operations[i]``
counts closings; ``bank.violations`` lists re-closings inside ``discharge_s``.

Relay I/O device: coils ``0..n-1``; a coil mapped in ``switches`` runs that load.

Also: ``fleet_site(n, seed=, profile=)`` (n meters with their own load mixes, for
fleets and benchmarks); ``site.meter_values(unit)`` (what a meter reads now, with
noise and faults); ``site.waveform(unit, site_slug, seq)`` (a ``Waveform`` from the
same operating point); ``site.inject_at(t, fault, unit, duration_s)`` (scheduled
faults); ``SimServer(site, port, framer="rtu")`` (RTU over TCP) or
``SimServer(site, serial="/dev/pts/N")`` (RTU on a serial port). Unit ids without a
device answer exception 0x0B, as a TCP gateway does.

Fixed loads: ``MeterFleet(port, {unit: LoadModel})`` serves fixed per-phase loads
(PMTR_001 layout) and :func:`expected_pf` gives their noiseless PF.

Where things are: :mod:`~services.simulator.equipment` (supply, loads, bank,
relays), :mod:`~services.simulator.plant` (meters, faults, :class:`SimSite`),
:mod:`~services.simulator.server` (:class:`SimServer`, the register images),
:mod:`~services.simulator.sites` (ready-made plants), :mod:`~services.simulator.cli`
(``pfmon simulate``).
"""

from __future__ import annotations

from services.simulator.equipment import (
    VFD,
    CapacitorBank,
    Heater,
    Load,
    Motor,
    RelayIO,
    ServerPSU,
    Supply,
)
from services.simulator.plant import FAULTS, MeterState, PlantState, SimSite
from services.simulator.server import SimServer
from services.simulator.sites import (
    LoadModel,
    MeterFleet,
    expected_pf,
    fleet_site,
    inductive_site,
)

__all__ = [
    "FAULTS",
    "VFD",
    "CapacitorBank",
    "Heater",
    "Load",
    "LoadModel",
    "MeterFleet",
    "MeterState",
    "Motor",
    "PlantState",
    "RelayIO",
    "ServerPSU",
    "SimServer",
    "SimSite",
    "Supply",
    "expected_pf",
    "fleet_site",
    "inductive_site",
]
