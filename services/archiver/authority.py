"""The topic is the authority: which messages the archiver may store.

A message is stored only when the site and the name (meter, device or gateway) of its
topic are the payload's, and the site knows that name. What a site knows: the meters
of its site file, the sources tuned under ``analytics.meters``, its output devices,
capacitor banks and the devices they drive, its gateway, plus the names listed for it
under ``archiver.known``. A central archiver (``archiver.sites: all`` or a list) knows
the sites of the site files in ``archiver.site_dir`` and the sites listed under
``archiver.known``; every other site is unknown. The sets are fixed at start: nothing
grows with what arrives.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from shared import topics
from shared.errors import ConfigError
from shared.messages import ActuatorState, Command, GatewayStatus
from shared.site import SiteConfig, load_site

#: the ``reason`` label of the refusal counter (a fixed set)
REASONS = (
    "site_mismatch",
    "name_mismatch",
    "unknown_site",
    "unknown_name",
    "bad_topic",
    "interval_mismatch",
)

#: parsed topics remembered (the cache is emptied when full: bounded memory)
_MAX_TOPICS = 20_000


def site_names(site: SiteConfig) -> set[str]:
    """Every name that a site's own topics may carry, from its site file."""
    names = {m.name for m in site.meters}
    names.update(site.analytics.meters)
    names.update(d.name for d in site.devices)
    for bank in site.banks:
        names.update((bank.name, bank.device))
    names.add(site.gateway)
    return names


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # one of REASONS
    text: str  # what and where, for the dead letter and the log


def _payload_name(model: BaseModel) -> str:
    if isinstance(model, Command | ActuatorState):
        return model.device
    if isinstance(model, GatewayStatus):
        return model.gateway
    return str(getattr(model, "meter"))  # noqa: B009 - Reading, Metrics, Event


class Authority:
    """Checks one message against its topic and the known names."""

    def __init__(self, known: dict[str, set[str]]) -> None:
        self.known = {site: frozenset(names) for site, names in known.items()}
        self._topics: dict[str, topics.TopicParts] = {}

    @classmethod
    def for_site(cls, site: SiteConfig, site_files: Iterable[SiteConfig] = ()) -> Authority:
        cfg = site.archiver
        known: dict[str, set[str]] = {}
        for other in (site, *site_files):
            known.setdefault(other.site, set()).update(site_names(other))
        for name, extra in cfg.known.items():
            known.setdefault(name, set()).update(extra)
        return cls(known)

    def check(self, topic: str, model: BaseModel) -> Refusal | None:
        parts = self._topics.get(topic)
        if parts is None:
            try:
                parts = topics.parse(topic)
            except ConfigError as exc:
                return Refusal("bad_topic", str(exc))
            if len(self._topics) >= _MAX_TOPICS:
                self._topics.clear()
            self._topics[topic] = parts
        site = getattr(model, "site", None)
        if site != parts.site:
            return Refusal(
                "site_mismatch", f"payload site {site!r} on topic {topic!r} of site {parts.site!r}"
            )
        name = _payload_name(model)
        if name != parts.name:
            return Refusal(
                "name_mismatch", f"payload names {name!r} on topic {topic!r} of {parts.name!r}"
            )
        if parts.interval is not None:
            refusal = _check_interval(topic, parts.interval, model)
            if refusal is not None:
                return refusal
        names = self.known.get(parts.site)
        if names is None:
            return Refusal("unknown_site", f"site {parts.site!r} of topic {topic!r} is not known")
        if name not in names:
            return Refusal(
                "unknown_name",
                f"{name!r} of topic {topic!r} is not a meter, device or gateway of site"
                f" {parts.site!r}",
            )
        return None


def _check_interval(topic: str, level: str, model: BaseModel) -> Refusal | None:
    """On an aggregate's level (``metrics/3s``) only an aggregate of that interval.
    (An aggregate on the per-input ``metrics`` topic, as an older edge sends it, is kept.)"""
    interval_s = getattr(model, "interval_s", None)
    if getattr(model, "aggregate", False) and interval_s == int(level[:-1]):
        return None
    what = (
        f"an aggregate of {interval_s!r} s"
        if getattr(model, "aggregate", False)
        else ("not an aggregate")
    )
    return Refusal("interval_mismatch", f"payload is {what} on topic {topic!r} of {level}")


def load_site_dir(folder: Path) -> list[SiteConfig]:
    """Every site file (``*.yaml``, ``*.yml``) of ``folder``; a bad one raises ConfigError
    naming it. Two files of one site are refused."""
    if not folder.is_dir():
        raise ConfigError(f"archiver.site_dir: {folder} is not a folder")
    out: list[SiteConfig] = []
    seen: dict[str, Path] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        cfg = load_site(path)
        if cfg.site in seen:
            raise ConfigError(
                f"archiver.site_dir: {path} and {seen[cfg.site]} both describe site {cfg.site!r}"
            )
        seen[cfg.site] = path
        out.append(cfg)
    return out
