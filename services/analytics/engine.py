"""One meter's analytics: a single-meter view of the site-wide engine.

:class:`MeterEngine` takes a register-level :class:`Reading` or a
:class:`Waveform` of one meter and returns the :class:`Metrics` and
:class:`Event` messages to publish. It is :class:`~services.analytics.batch.SiteEngine`
fed one input at a time (one implementation of the analytics, whatever the
batch size): the ``analyze`` command, tests and the latency path use it. No I/O
here: the service wires the engine to the bus.
"""

from __future__ import annotations

from services.analytics.batch import MAX_METERS, SiteEngine, TooManyMeters, analyze_waveform
from services.analytics.output import SERVICE, MetricsOut, Output, encode_metrics, seq_seed
from shared.messages import Reading, Waveform
from shared.site import SiteConfig

__all__ = [
    "MAX_METERS",
    "SERVICE",
    "MeterEngine",
    "MetricsOut",
    "Output",
    "SiteEngine",
    "TooManyMeters",
    "analyze_waveform",
    "encode_metrics",
    "seq_seed",
]


class MeterEngine:
    """The analytics of one meter (a :class:`SiteEngine` holding that meter only)."""

    def __init__(self, site: SiteConfig, meter: str):
        self.meter = meter
        self.site = SiteEngine(site, max_meters=1)
        self.site.track(meter)

    @property
    def seq(self) -> int:
        """The last metrics seq used."""
        return self.site.seq(self.meter)

    def on_reading(self, reading: Reading) -> Output:
        return self.site.on_readings([reading])[0]

    def on_waveform(self, wf: Waveform) -> Output:
        return self.site.on_waveform(wf)
