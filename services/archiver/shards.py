"""Archive shards: central archivers split the sites among themselves without ``$share``.

A clustered broker that speaks only MQTT 3.1.1 (NATS JetStream's MQTT gateway,
RabbitMQ's ``rabbitmq_mqtt``) has no shared subscriptions, so archivers cannot let the
broker spread the messages. Instead:

* the sites are hashed into a fixed number of **shards** (``archiver.shards``, e.g.
  16; :func:`site_shard`: a stable hash of the site slug, the same in every process
  and release);
* shard ``k`` is ONE persistent MQTT session, client id ``pfm-archiver-{site}-shard-{k}``
  (``{site}`` is the central archiver's own site), subscribed to the archived topics
  of the sites hashed to ``k``. The broker keeps that session and its QoS 1 queue
  whoever holds it, and whether anyone does;
* every archiver instance (a **member**) announces itself on
  ``pfm/v1/{site}/archiver/{member}/presence``: retained, refreshed every
  ``archiver.heartbeat_s``, with a retained last will that says ``online: false``.
  A member not heard for ten heartbeats while this one was connected counts as gone
  too (its broker node died with it, so its will was never published); time this
  member spends disconnected (a broker failover) never counts against the others;
* each member holds the shards that rendezvous hashing (:func:`owner`) gives it over
  the live members: a restart or a new member moves only the shards it must, and
  every shard has exactly one owner once the members agree on who is alive.

When a shard moves, its session moves with it: the old owner closes its connection
(what it had read but not committed is never acknowledged, so the broker delivers it
again to the new owner) and the new owner resumes the session after a short hand-over
delay. The archive's natural keys make the overlap harmless: a message written by both
is stored once. If two members briefly hold one shard, the broker keeps only the
newer connection; the older one stops (``ClientIdInUse``) and is retried at the next
re-assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, Field

from shared import topics
from shared.bus import Bus, BusUnavailable, ClientIdInUse, Incoming
from shared.errors import ConfigError
from shared.metrics import ServiceMetrics
from shared.settings import Settings

log = logging.getLogger(__name__)

#: a member is gone when it has not been heard for this many heartbeats while this one
#: was connected (a failover of the broker may take seconds: none of that counts)
TTL_HEARTBEATS = 10.0
#: a shard gained waits this many heartbeats, so that its previous owner lets go first
HANDOVER_HEARTBEATS = 0.5
_NOT_SLUG = re.compile(r"[^a-z0-9_-]+")


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def site_shard(site: str, shards: int) -> int:
    """The shard of ``site`` among ``shards``: a stable hash (blake2b), never Python's
    per-process ``hash()``."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, not {shards}")
    return _hash64(f"site/{site}") % shards


def owner(shard: int, members: Iterable[str]) -> str | None:
    """The member that holds ``shard``: the highest rendezvous hash of (member, shard).
    None without members."""
    best: tuple[int, str] | None = None
    for member in members:
        key = (_hash64(f"{member}/shard/{shard}"), member)
        if best is None or key > best:
            best = key
    return None if best is None else best[1]


def assign(sites: Iterable[str], shards: int) -> dict[int, list[str]]:
    """The shards that have sites, each with its sites (sorted)."""
    out: dict[int, list[str]] = {}
    for site in sorted(set(sites)):
        out.setdefault(site_shard(site, shards), []).append(site)
    return out


def member_slug(member: str) -> str:
    """A member id as a topic level: lower case, anything else than ``[a-z0-9_-]`` -> ``-``."""
    slug = _NOT_SLUG.sub("-", member.lower()).strip("-")
    if not slug:
        raise ConfigError(f"archiver member id {member!r} has no letter or digit for its topic")
    return slug


def presence_topic(site: str, member: str) -> str:
    return (
        f"{topics.ROOT}/{topics.check_slug(site, 'site')}/archiver/{member_slug(member)}/presence"
    )


def presence_pattern(site: str) -> str:
    return f"{topics.ROOT}/{topics.check_slug(site, 'site')}/archiver/+/presence"


class Presence(BaseModel):
    """One member's announcement (retained)."""

    member: str = Field(min_length=1, max_length=200)
    online: bool
    #: wall-clock time of the announcement (UNIX seconds): members' clocks follow NTP
    ts: float
    shards: list[int] = Field(default_factory=list)


class ShardMetrics:
    def __init__(self, metrics: ServiceMetrics) -> None:
        r = metrics.registry
        self.members = Gauge(
            "pfm_archiver_members", "Archiver members this one sees alive", registry=r
        )
        self.owned = Gauge(
            "pfm_archiver_shards_owned",
            "Archive shards whose session this member holds",
            registry=r,
        )
        self.moves = Counter(
            "pfm_archiver_shard_moves_total",
            "Shards this member took (gained) or let go (released)",
            ["how"],
            registry=r,
        )


class ShardManager:
    """Holds this member's shards: one :class:`Bus` (persistent session) per shard.

    ``subscribe(bus, sites)`` registers the archived topics of ``sites`` on a shard's
    bus (the archiver's own handler). Use as ``async with manager:``; :attr:`bus` is the
    member's presence connection (for dead letters), connected when entered.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        site: str,
        sites: Iterable[str],
        shards: int,
        heartbeat_s: float,
        metrics: ServiceMetrics,
        subscribe: Callable[[Bus, list[str]], None],
        member: str | None = None,
        service: str = "archiver",
    ) -> None:
        if shards < 1:
            raise ConfigError(f"archiver.shards must be >= 1 for shard mode, not {shards}")
        self.settings = settings
        self.site = site
        self.service = service
        self.shards = shards
        self.heartbeat_s = heartbeat_s
        self.metrics = metrics
        self.m = ShardMetrics(metrics)
        self._subscribe = subscribe
        self.by_shard = assign(sites, shards)
        largest = max((len(v) for v in self.by_shard.values()), default=0)
        log.info(
            "%d sites in %d of %d shards, at most %d in one shard session (on NATS, its"
            " subscriptions x mqtt.max_ack_pending must stay <= 65535)",
            sum(len(v) for v in self.by_shard.values()),
            len(self.by_shard),
            shards,
            largest,
        )
        self.member = member or settings.mqtt_client_id or f"pfm-{service}-{site}-{_host()}"
        self.topic = presence_topic(site, self.member)
        self.prefix = f"pfm-{service}-{site}-shard"
        #: member -> (online, wall-clock ts of its last announcement)
        self.seen: dict[str, tuple[bool, float]] = {}
        self.running: dict[int, asyncio.Task[None]] = {}
        self.buses: dict[int, Bus] = {}
        #: when a shard was first wanted (monotonic): it starts after the hand-over delay
        self._wanted_since: dict[int, float] = {}
        self._changed = asyncio.Event()
        #: wall-clock time the presence connection last (re)subscribed
        self._since = time.time()
        self._task: asyncio.Task[None] | None = None
        will = orjson.dumps(
            Presence(member=self.member, online=False, ts=0.0).model_dump(mode="json")
        )
        self.bus = Bus(
            settings,
            service=service,
            site=site,
            metrics=metrics,
            client_id=f"{self.member}-presence",
            will=(self.topic, will),
            persistent=False,
        )
        self.bus.subscribe(presence_pattern(site), Presence, self._on_presence)
        self.bus.on_connect(self._announce_on_connect)

    def client_id(self, shard: int) -> str:
        return f"{self.prefix}-{shard:02d}"

    # -- membership --------------------------------------------------------------------

    async def _on_presence(self, presence: Presence, incoming: Incoming) -> None:
        if presence.member == self.member:
            return  # we know we are alive; an old will of ours must not stop us
        before = self.alive()
        self.seen[presence.member] = (presence.online, presence.ts)
        if self.alive() != before:
            self._changed.set()

    def alive(self, now: float | None = None) -> list[str]:
        """The members taken as alive (this one always), sorted: those whose last word
        was ``online`` and who were heard within the TTL of this member's connection."""
        now = time.time() if now is None else now
        ttl = TTL_HEARTBEATS * self.heartbeat_s
        members = {
            m
            for m, (online, ts) in self.seen.items()
            if online and now - max(ts, self._since) <= ttl
        }
        members.add(self.member)
        return sorted(members)

    def wanted(self, now: float | None = None) -> set[int]:
        """The shards (with sites) this member should hold now."""
        members = self.alive(now)
        return {k for k in self.by_shard if owner(k, members) == self.member}

    async def _announce(self, online: bool = True) -> None:
        presence = Presence(
            member=self.member, online=online, ts=time.time(), shards=sorted(self.running)
        )
        await self.bus.publish(
            self.topic, orjson.dumps(presence.model_dump(mode="json")), retain=True
        )

    async def _announce_on_connect(self, bus: Bus) -> None:
        self._since = time.time()
        try:
            await self._announce()
        except BusUnavailable as exc:
            log.warning("could not announce %s: %s", self.member, exc)

    # -- shards ------------------------------------------------------------------------

    async def _hold(self, shard: int) -> None:
        """Hold one shard's session until cancelled (or taken over by another member)."""
        bus = Bus(
            self.settings,
            service=self.service,
            site=self.site,
            metrics=self.metrics,
            client_id=self.client_id(shard),
            manual_ack=True,
        )
        self._subscribe(bus, self.by_shard[shard])
        self.buses[shard] = bus
        try:
            async with bus:
                await asyncio.Event().wait()
        except ClientIdInUse:
            log.warning(
                "shard %d (%s) was taken by another member; re-assigned at the next change",
                shard,
                ", ".join(self.by_shard[shard]),
            )
        finally:
            self.buses.pop(shard, None)
            # a closed shard session zeroes the service's pfm_bus_connected, which health
            # checks read: it says the member's own (presence) connection again
            self.metrics.bus_connected.labels(self.service).set(1 if self.bus.connected else 0)

    def _start(self, shard: int) -> None:
        log.info(
            "taking shard %d (sites %s) as %s",
            shard,
            ", ".join(self.by_shard[shard]),
            self.member,
        )
        self.m.moves.labels("gained").inc()
        task = asyncio.get_running_loop().create_task(
            self._hold(shard), name=f"archiver-shard-{shard}"
        )
        self.running[shard] = task

    async def _stop(self, shard: int) -> None:
        task = self.running.pop(shard)
        self.m.moves.labels("released").inc()
        log.info("letting go of shard %d (sites %s)", shard, ", ".join(self.by_shard[shard]))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def rebalance(self) -> None:
        """Stop the shards no longer ours at once; start the ones gained after the
        hand-over delay; restart a shard whose session another member took."""
        if not self.bus.connected:
            return  # blind: keep what we hold (its sessions reconnect by themselves)
        now = time.monotonic()
        wanted = self.wanted()
        for shard in [k for k in self.running if k not in wanted]:
            await self._stop(shard)
        for shard, task in list(self.running.items()):
            if task.done():  # taken over: try again after the hand-over delay
                del self.running[shard]
                self._wanted_since[shard] = now
        for shard in list(self._wanted_since):
            if shard not in wanted:
                del self._wanted_since[shard]
        delay = HANDOVER_HEARTBEATS * self.heartbeat_s
        for shard in sorted(wanted - set(self.running)):
            since = self._wanted_since.setdefault(shard, now)
            if now - since >= delay:
                del self._wanted_since[shard]
                self._start(shard)
        self.m.owned.set(len(self.running))
        self.m.members.set(len(self.alive()))

    async def run(self) -> None:
        """Announce every heartbeat and keep the shards assigned, until cancelled."""
        await self.bus.wait_subscribed()
        # the retained announcements arrive right after the SUBACK
        await asyncio.sleep(min(1.0, self.heartbeat_s))
        next_beat = time.monotonic()
        tick = min(0.25, HANDOVER_HEARTBEATS * self.heartbeat_s / 2)
        while True:
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.heartbeat_s
                with contextlib.suppress(BusUnavailable):
                    await self._announce()
            await self.rebalance()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), tick)

    async def __aenter__(self) -> ShardManager:
        await self.bus.__aenter__()
        self._task = asyncio.get_running_loop().create_task(
            self.run(), name="archiver-shard-manager"
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for shard in list(self.running):
            await self._stop(shard)
        # a clean stop: say so at once, so that the others take the shards now
        with contextlib.suppress(BusUnavailable):
            await self._announce(online=False)
        await self.bus.__aexit__(None, None, None)

    def describe(self) -> dict[str, Any]:
        """What this member holds and sees (for logs and tests)."""
        return {
            "member": self.member,
            "alive": self.alive(),
            "shards": sorted(self.running),
            "sites": sorted(s for k in self.running for s in self.by_shard[k]),
        }


def _host() -> str:
    import socket

    return socket.gethostname()
