"""MQTT topics under the versioned root ``pfm/v1`` (DESIGN.md, "Topics").

Names are slugs (``[a-z0-9_-]+``). A name that is not a slug is refused, never
rewritten.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator

from shared.errors import ConfigError

ROOT = "pfm/v1"
_SLUG = re.compile(r"^[a-z0-9_-]+$")
_INTERVAL = re.compile(r"^[1-9][0-9]*s$")


def check_slug(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a slug, else raise :class:`ConfigError` saying why."""
    if not isinstance(value, str) or not _SLUG.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} is not a slug: use only lower-case letters, digits, '_' and '-'"
        )
    return value


def _slug_validator(value: str) -> str:
    if not _SLUG.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a slug: use only lower-case letters, digits, '_' and '-'"
        )
    return value


#: pydantic type for a slug field (site, meter, device, gateway, rule names).
Slug = Annotated[str, AfterValidator(_slug_validator)]


class Kind(StrEnum):
    READING = "reading"
    WAVEFORM = "waveform"
    METRICS = "metrics"
    EVENT = "event"
    COMMAND = "command"
    REQUEST = "request"
    STATE = "state"
    STATUS = "status"
    DEADLETTER = "deadletter"
    ARCHIVE = "archive"


def reading(site: str, meter: str) -> str:
    return f"{ROOT}/{check_slug(site, 'site')}/{check_slug(meter, 'meter')}/reading"


def waveform(site: str, meter: str) -> str:
    return f"{ROOT}/{check_slug(site, 'site')}/{check_slug(meter, 'meter')}/waveform"


def metrics(site: str, meter: str) -> str:
    return f"{ROOT}/{check_slug(site, 'site')}/{check_slug(meter, 'meter')}/metrics"


def interval_level(interval_s: float) -> str:
    """The topic level of an aggregate interval: whole seconds, ``3s``, ``600s``."""
    if not interval_s > 0 or interval_s != int(interval_s):
        raise ConfigError(f"aggregate interval {interval_s!r} s is not a whole number of seconds")
    return f"{int(interval_s)}s"


def aggregate(site: str, meter: str, interval_s: float) -> str:
    """An aggregate's own topic, a level below the meter's ``metrics``:
    ``pfm/v1/{site}/{meter}/metrics/{interval}`` (``metrics/3s``, ``metrics/600s``).
    ``pattern(Kind.METRICS)`` (``metrics/#``) takes both; a bridge or subscriber that
    wants only aggregates takes :func:`aggregates_pattern`."""
    return f"{metrics(site, meter)}/{interval_level(interval_s)}"


def instant_pattern(site: str = "+", name: str = "+") -> str:
    """The per-input metrics only (``.../metrics``, no aggregates)."""
    return f"{ROOT}/{site}/{name}/metrics"


def aggregates_pattern(site: str = "+", name: str = "+", interval: str = "+") -> str:
    """The aggregates only (``.../metrics/+``, or one interval: ``interval="600s"``)."""
    return f"{ROOT}/{site}/{name}/metrics/{interval}"


def event(site: str, meter: str) -> str:
    return f"{ROOT}/{check_slug(site, 'site')}/{check_slug(meter, 'meter')}/event"


def command(site: str, device: str) -> str:
    return f"{ROOT}/{check_slug(site, 'site')}/actuator/{check_slug(device, 'device')}/command"


def request(site: str, device: str) -> str:
    """An operator's request to the actuator (console only: manual mode, a step, auto)."""
    return f"{ROOT}/{check_slug(site, 'site')}/actuator/{check_slug(device, 'device')}/request"


def state(site: str, device: str) -> str:
    return f"{ROOT}/{check_slug(site, 'site')}/actuator/{check_slug(device, 'device')}/state"


def gateway_status(site: str, gateway: str) -> str:
    return f"{ROOT}/{check_slug(site, 'site')}/gateway/{check_slug(gateway, 'gateway')}/status"


def deadletter(site: str, service: str) -> str:
    return f"{ROOT}/{check_slug(site, 'site')}/deadletter/{check_slug(service, 'service')}"


def archive(site: str, service: str) -> str:
    """A service's archive batches (``ArchiveBatch``: many metrics messages of the site
    for its archiver, also published one by one on their meters' topics)."""
    return f"{ROOT}/{check_slug(site, 'site')}/archive/{check_slug(service, 'service')}"


def pattern(kind: Kind, site: str = "+", name: str = "+") -> str:
    """Subscription filter, e.g. ``pattern(Kind.READING)`` -> ``pfm/v1/+/+/reading``.
    ``Kind.METRICS`` gives ``.../metrics/#``: the per-input metrics and the aggregates
    below them (MQTT's ``#`` matches its parent level too)."""
    if kind is Kind.METRICS:
        return f"{ROOT}/{site}/{name}/metrics/#"
    if kind in (Kind.COMMAND, Kind.STATE, Kind.REQUEST):
        return f"{ROOT}/{site}/actuator/{name}/{kind.value}"
    if kind is Kind.STATUS:
        return f"{ROOT}/{site}/gateway/{name}/status"
    if kind is Kind.DEADLETTER:
        return f"{ROOT}/{site}/deadletter/{name}"
    if kind is Kind.ARCHIVE:
        return f"{ROOT}/{site}/archive/{name}"
    return f"{ROOT}/{site}/{name}/{kind.value}"


def kind_of(topic: str) -> str:
    """A topic's kind level (``reading``, ``metrics`` ...): what metrics label it by; an
    aggregate's topic (``.../metrics/3s``) and the filters ``.../metrics/#``,
    ``.../metrics/+`` are ``metrics``. Cheap, with no checks: for topics this process
    subscribed to or published."""
    head, _, last = topic.rpartition("/")
    if head.endswith("/metrics") and (
        last in ("#", "+") or (last[-1:] == "s" and last[:-1].isdigit())
    ):
        return "metrics"
    if head.endswith("/archive"):
        return "archive"
    return last


@dataclass(frozen=True, slots=True)
class TopicParts:
    site: str
    name: str  # meter, device, gateway or service
    kind: Kind
    #: an aggregate's interval level (``3s``, ``600s``); None for every other topic
    interval: str | None = None


def parse(topic: str) -> TopicParts:
    """Split a concrete pfm topic. Raises :class:`ConfigError` naming what is wrong."""
    parts = topic.split("/")
    if len(parts) < 5 or f"{parts[0]}/{parts[1]}" != ROOT:
        raise ConfigError(f"topic {topic!r} is not under {ROOT}/")
    site = parts[2]
    check_slug(site, "site")
    rest = parts[3:]
    if len(rest) == 3 and rest[0] == "actuator" and rest[2] in ("command", "state", "request"):
        return TopicParts(site, check_slug(rest[1], "device"), Kind(rest[2]))
    if len(rest) == 3 and rest[0] == "gateway" and rest[2] == "status":
        return TopicParts(site, check_slug(rest[1], "gateway"), Kind.STATUS)
    if len(rest) == 2 and rest[0] == "deadletter":
        return TopicParts(site, check_slug(rest[1], "service"), Kind.DEADLETTER)
    if len(rest) == 2 and rest[0] == "archive":
        return TopicParts(site, check_slug(rest[1], "service"), Kind.ARCHIVE)
    if len(rest) == 2 and rest[1] in (
        Kind.READING,
        Kind.WAVEFORM,
        Kind.METRICS,
        Kind.EVENT,
    ):
        return TopicParts(site, check_slug(rest[0], "meter"), Kind(rest[1]))
    if len(rest) == 3 and rest[1] == Kind.METRICS and _INTERVAL.fullmatch(rest[2]):
        return TopicParts(site, check_slug(rest[0], "meter"), Kind.METRICS, rest[2])
    raise ConfigError(f"topic {topic!r} has an unknown layout")
