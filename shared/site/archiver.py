"""Site-file section owned by the archiver (``archiver:``), with the tariff of the report."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.site.core import Duration
from shared.topics import Slug


class RetentionConfig(BaseModel):
    """How long each kind of data is kept (TimescaleDB retention policies; days)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    readings_days: float = Field(7, gt=0, description="raw readings (short)")
    metrics_days: float = Field(730, gt=0, description="per-interval metrics (long)")
    rollups_days: float | None = Field(None, gt=0, description="1m/15m/1h rollups; None = keep")
    events_days: float | None = Field(None, gt=0, description="events/commands/status; None = keep")
    compress_after_days: float = Field(7, gt=0, description="compress chunks older than this")
    chunk_interval_hours: float = Field(24, gt=0, le=24 * 30, description="hypertable chunk size")


class TariffConfig(BaseModel):
    """A utility's reactive-energy tariff; every component can be switched off with null."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    currency: str = "EUR"
    #: reactive energy above tan_phi_limit * kWh is billed per kvarh (e.g. 0.4 ~ PF 0.928)
    tan_phi_limit: float | None = Field(0.4, ge=0, le=5)
    kvarh_price: float = Field(0.02, ge=0, description="per billable kvarh")
    #: billing demand = max(peak kW, demand_k * peak kVA) over 15-min windows (e.g. 0.90)
    demand_k: float | None = Field(0.90, gt=0, le=1)
    demand_price_per_kw: float = Field(10.0, ge=0, description="per kW of billing demand")
    #: peak kvar above what pf_threshold allows at the peak kW is billed per kvar
    pf_threshold: float | None = Field(0.90, gt=0, le=1)
    kvar_price: float = Field(3.0, ge=0, description="per excess kvar of demand")
    #: reactive energy from meters that give no lead/lag: count it as inductive, or ignore it
    unsigned_reactive: Literal["inductive", "ignore"] = "inductive"


class ReportConfig(BaseModel):
    """``pfmon report`` settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    tariff: TariffConfig = Field(default_factory=TariffConfig)
    target_pf: float | None = Field(
        None,
        gt=0,
        le=1,
        description="PF the capacitor sizing aims at (default thresholds.pf_alert)",
    )
    short_circuit_mva: float | None = Field(
        None, gt=0, description="short-circuit power at the capacitor bus (resonance check)"
    )
    harmonic_present_pct: float = Field(
        3.0, gt=0, le=100, description="a current harmonic >= this % of the fundamental is present"
    )
    resonance_margin: float = Field(
        0.10, gt=0, le=0.5, description="warn when the resonance order is within this fraction"
    )
    max_gap_s: Duration = Field(
        300, gt=0, description="rows further apart than this are not bridged (energy, hours)"
    )
    worst_meters: int = Field(5, ge=1, le=100)


class ArchiverConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    batch_size: int = Field(500, ge=1, le=100_000)
    flush_interval_s: Duration = Field(1.0, gt=0, le=60)
    #: messages held in memory (not yet acknowledged) before they spill to disk
    buffer_max_records: int = Field(20_000, ge=1, le=10_000_000)
    #: spill file bound; when full the oldest records are dropped and counted
    spill_max_records: int = Field(5_000_000, ge=1000)
    retry_max_s: Duration = Field(10.0, gt=0, le=600, description="longest wait between DB retries")
    keep_readings: bool = Field(True, description="store raw readings in pfm_readings")
    #: take the metrics from analytics' archive batches (``pfm/v1/{site}/archive/+``,
    #: many messages each) instead of the per-meter ``metrics`` topics: the analytics of
    #: every site archived here must publish them (``analytics.archive_batches: true``)
    archive_batches: bool = Field(
        False, description="metrics from analytics' archive batches, not per-meter topics"
    )
    #: own = this site's topics; all = every site on the broker (the central store,
    #: fed by the edge gateways' bridges); a list of site slugs = those sites only (to
    #: split a centre between archivers, each with its own plain persistent subscriptions)
    sites: Literal["own", "all"] | list[Slug] = "own"
    #: MQTT v5 shared-subscription group; null (the default) = plain persistent
    #: subscriptions. Lossless only while the broker keeps the group's sessions: see
    #: docs/archiver.md before setting it.
    share_group: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$")
    #: on a clustered broker without shared subscriptions (NATS, RabbitMQ): the sites are
    #: hashed into this many shards, one persistent session each, and the archivers that
    #: run take the shards among themselves (0 = off; docs/deployment.md)
    shards: int = Field(0, ge=0, le=1024)
    #: shard mode: how often an archiver announces itself; one silent for 3 is gone
    heartbeat_s: Duration = Field(2.0, ge=0.2, le=60)
    #: names (meters, devices, gateways) a site's topics may carry beyond those its site
    #: file lists, by site; for a central archiver, the sites and names it accepts
    known: dict[Slug, list[Slug]] = Field(default_factory=dict)
    #: a folder of site files (``*.yaml``): every site there, with the names it lists, is
    #: known (a central archiver keeps the edges' site files here)
    site_dir: Path | None = None
    timescaledb: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: use the extension when installed or installable"
    )
    #: each refresh recomputes the open minute from all its rows: every 5 s cost the
    #: database ~28 µs a row, every 30 s ~6 µs (bench/RESULTS.md)
    rollup_interval_s: Duration = Field(
        30.0, gt=0, le=3600, description="plain PostgreSQL: how often rollups are refreshed"
    )
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _buffer(self) -> ArchiverConfig:
        if isinstance(self.sites, list) and not self.sites:
            raise ValueError("sites: an empty list archives nothing (use own, all or slugs)")
        if self.shards and self.share_group is not None:
            raise ValueError(
                "shards and share_group exclude each other: shards split the sites where the"
                " broker has no shared subscriptions"
            )
        if self.buffer_max_records < self.batch_size:
            raise ValueError(
                f"buffer_max_records ({self.buffer_max_records}) must be at least "
                f"batch_size ({self.batch_size})"
            )
        return self
