"""The MQTT bus every service uses: an aiomqtt wrapper as an async context manager.

* publishes models (orjson) at QoS 1;
* typed handlers per topic pattern: a payload is validated where it enters, and
  a malformed or wrong-schema payload goes to ``pfm/v1/{site}/deadletter/{service}``
  with the reason, a counter goes up, and the service carries on (a model's
  ``salvage`` may keep the sound part: a reading without its implausible values
  goes to the handler, the dead letter names what was refused);
* connects in the background and reconnects with exponential backoff and jitter,
  resubscribing every pattern; a broker that is down at start is retried, never fatal;
  with several nodes in ``PFM_MQTT_URL`` (a clustered broker) every failed or lost
  connection moves on to the next node, and the persistent session resumes there;
* MQTT v5 where the broker speaks it, 3.1.1 otherwise (``PFM_MQTT_PROTOCOL=auto``);
* persistent sessions (stable client id, clean start off) so QoS 1 messages that
  arrive while a service is away are delivered when it is back;
* TLS (CA, client certificate) and username/password from :class:`Settings`;
* optional manual acknowledgement: the handler calls :meth:`Incoming.ack` only
  after its data is safe downstream (the archiver does); acknowledgements are
  written in one buffer per event-loop pass, and only on the connection the
  message came from (after a reconnect the broker re-delivers what was not acked);
* two ways to publish: :meth:`Bus.publish` awaits the broker's PUBACK (one future per
  message - for commands, status, dead letters); :meth:`Bus.publish_nowait` hands the
  packet over and returns at once, for streams of results (analytics):

  - it raises :class:`BusUnavailable` only when not connected; after that the
    outcome comes later: on the broker's PUBACK ``pfm_messages_published_total``
    goes up; when the broker refuses it (MQTT v5 reason code >= 0x80) or the
    connection drops before the PUBACK, ``pfm_publish_failures_total`` goes up and
    every callback given to :meth:`Bus.on_publish_failed` gets
    ``(topic, payload, reason)`` - it may spool or publish again (at-least-once);
  - at most ``max_inflight`` messages are unconfirmed on the wire, the rest wait
    in order in memory; :attr:`Bus.unconfirmed` counts both, and
    ``await bus.drain(timeout)`` waits until every one is confirmed or failed
    (call it before a clean shutdown);
  - ``publish_nowait(..., after=group)`` ties the message to an :class:`AckGroup`
    of received messages (from an :class:`AckQueue`): they are acknowledged once
    every message published for them is confirmed (or refused by the broker: sending
    it again would not help), in the order they were received; when one is lost
    with the connection, none of them is, and the broker re-delivers them (a count per
    group, no future per message: the cost is a counter step per PUBACK).

The wire is aiomqtt's, with the receive, acknowledge and ``publish_nowait`` paths
replaced by :mod:`shared._mqtt_fast` (whole socket reads parsed in batches) when the
installed aiomqtt/paho are the versions it knows, and ``PFM_MQTT_FAST`` is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import aiomqtt
import orjson
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ValidationError

from shared import _mqtt_fast, topics
from shared.backoff import Backoff as Backoff  # part of the Bus API (``backoff=``)
from shared.errors import ConfigError, PeerError
from shared.messages import DeadLetter, describe_error
from shared.metrics import ServiceMetrics
from shared.settings import Settings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class BusUnavailable(PeerError):
    """The broker is not connected right now; the caller decides (spool, retry)."""


class PublishRefused(BusUnavailable):
    """The broker refused this publish (MQTT v5 reason code >= 0x80, e.g. 0x87 when its
    ACL does not allow the topic): sending it again will not help, so do not spool it."""


class ClientIdInUse(ConfigError):
    """Another process connected with this service's MQTT client id (the broker took
    the session over): two of them would kick each other off for ever, so stop."""


#: MQTT v5 DISCONNECT reason "Session taken over"
_SESSION_TAKEN_OVER = 0x8E
#: on MQTT 3.1.1 the broker just closes the older connection: this many connections
#: in a row lost within this many seconds of their CONNACK mean the same
_QUICK_DROPS = 3
_QUICK_DROP_S = 3.0


def _taken_over(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a v5 DISCONNECT with reason 0x8E."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, aiomqtt.MqttCodeError):
            rc = exc.rc
            value = rc if rc is None or isinstance(rc, int) else rc.value
            if value == _SESSION_TAKEN_OVER:
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


@dataclass(slots=True)
class Incoming:
    """One received message as the handler sees it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    _ack: Callable[[Incoming], None] | None = None
    _acked: bool = False

    def ack(self) -> None:
        """Acknowledge (manual-ack buses only; a no-op otherwise). Idempotent."""
        if self._ack is not None and not self._acked:
            self._acked = True
            self._ack(self)


Handler = Callable[[M, Incoming], Awaitable[None]]


class AckGroup:
    """Received messages acknowledged together once every message published for them
    (``Bus.publish_nowait(..., after=group)``) is confirmed. Made by :meth:`AckQueue.group`.
    """

    __slots__ = ("_lost", "_open", "_queue", "_sealed", "incoming")

    def __init__(self, queue: AckQueue, incoming: list[Incoming]) -> None:
        self._queue = queue
        self.incoming = incoming
        self._open = 0
        self._sealed = False
        self._lost = False

    @property
    def done(self) -> bool:
        """Sealed, and every publish for it confirmed or failed."""
        return self._sealed and self._open == 0

    @property
    def lost(self) -> bool:
        """A publish for it was not confirmed: its messages are never acknowledged."""
        return self._lost

    def add(self, incoming: Incoming) -> None:
        """One more received message (before :meth:`seal`)."""
        self.incoming.append(incoming)

    def seal(self) -> None:
        """Nothing more is published for it: acknowledge once the open publishes settle."""
        self._sealed = True
        if self._open == 0:
            self._queue.release()

    def lose(self) -> None:
        """A result could not be handed over: leave its messages for re-delivery."""
        self._lost = True

    def _published(self) -> None:
        self._open += 1

    def _settled(self, ok: bool) -> None:
        if not ok:
            self._lost = True
        self._open -= 1
        if self._open == 0 and self._sealed:
            self._queue.release()


class AckQueue:
    """Acknowledges the messages of :class:`AckGroup` s in the order the groups were made.

    A group that is done is acknowledged when every earlier group is done too (MQTT
    asks a receiver to acknowledge QoS 1 messages in the order they arrived); a lost
    group is skipped (its messages are re-delivered after the next connection).
    """

    def __init__(self) -> None:
        self._groups: deque[AckGroup] = deque()

    def group(self, incoming: list[Incoming] | None = None) -> AckGroup:
        """A new open group, after every group made so far."""
        group = AckGroup(self, incoming if incoming is not None else [])
        self._groups.append(group)
        return group

    @property
    def waiting(self) -> int:
        """Groups not acknowledged (nor skipped) yet."""
        return len(self._groups)

    def release(self) -> None:
        groups = self._groups
        while groups and groups[0].done:
            group = groups.popleft()
            if not group.lost:
                for incoming in group.incoming:
                    incoming.ack()


@dataclass(slots=True)
class _Subscription(Generic[M]):
    pattern: str  # without any $share prefix
    model: type[M]
    handler: Handler[M]
    qos: int
    share_group: str | None
    kind: str
    parts: list[str] = field(default_factory=list)
    received: Any = None  # this kind's metric children, looked up once
    seconds: Any = None

    @property
    def filter(self) -> str:
        if self.share_group:
            return f"$share/{self.share_group}/{self.pattern}"
        return self.pattern


def topic_matches(pattern_parts: list[str], topic: str) -> bool:
    """MQTT wildcard match of ``topic`` against a split filter (``+`` and ``#``)."""
    tparts = topic.split("/")
    for i, p in enumerate(pattern_parts):
        if p == "#":
            return True
        if i >= len(tparts):
            return False
        if p != "+" and p != tparts[i]:
            return False
    return len(tparts) == len(pattern_parts)


OnConnect = Callable[["Bus"], Awaitable[None]]
OnPublishFailed = Callable[[str, bytes, str], None]
_MAX_ROUTES = 10_000


_kind = topics.kind_of


class Bus:
    """An MQTT connection for one service. Use as ``async with Bus(...) as bus:``.

    Register handlers with :meth:`subscribe` before entering (or at any time: new
    patterns are subscribed at once when connected and after every reconnect).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        service: str,
        site: str,
        metrics: ServiceMetrics | None = None,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
        persistent: bool = True,
        manual_ack: bool = False,
        backoff: Backoff | None = None,
        max_inflight: int = 100,
    ) -> None:
        self.settings = settings
        self.service = service
        self.site = topics.check_slug(site, "site")
        self.metrics = metrics or ServiceMetrics(service, site)
        prefix = settings.mqtt_client_id or f"pfm-{service}-{site}-{socket.gethostname()}"
        self.client_id = client_id or prefix
        self._will = will
        self._persistent = persistent
        self._manual_ack = manual_ack
        self._backoff = backoff or Backoff()
        self._max_inflight = max_inflight
        self._subs: list[_Subscription[Any]] = []
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: subscriptions made while connected whose SUBACK has not come yet
        self._subscribing: set[asyncio.Task[None]] = set()
        self._on_connect: list[OnConnect] = []
        self._on_publish_failed: list[OnPublishFailed] = []
        self._link: _mqtt_fast.Link | None = None
        self._routes: dict[str, _Subscription[Any] | None] = {}
        self._published: dict[str, Any] = {}
        self._unconfirmed = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._dl_seq = 0
        self._nodes = len(settings.mqtt_targets())
        #: index of the node of ``PFM_MQTT_URL`` this bus connects to (next one after a loss)
        self._node = 0
        self._protocol: aiomqtt.ProtocolVersion | None = {
            "5": aiomqtt.ProtocolVersion.V5,
            "3.1.1": aiomqtt.ProtocolVersion.V311,
        }.get(settings.mqtt_protocol)
        self.connections = 0
        self.last_error: str | None = None
        #: set when another process took this client id over; raised on exit
        self.taken_over: ClientIdInUse | None = None
        self._owner: asyncio.Task[Any] | None = None

    # -- public API --------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def node(self) -> str:
        """``host:port`` of the broker node this bus is connected (or connecting) to."""
        target = self.settings.mqtt(self._node)
        return f"{target.host}:{target.port}"

    @property
    def protocol(self) -> str | None:
        """``"5"`` or ``"3.1.1"`` once connected."""
        if self._protocol is None:
            return None
        return "5" if self._protocol == aiomqtt.ProtocolVersion.V5 else "3.1.1"

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected; raises :class:`TimeoutError`."""
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def wait_subscribed(self, timeout: float | None = None) -> None:
        """Wait until connected and every subscription so far has its SUBACK; raises
        :class:`TimeoutError`. (Subscriptions registered before the connection are made
        before it counts as connected.)"""

        async def settled() -> None:
            await self._connected.wait()
            while self._subscribing:
                await asyncio.wait(set(self._subscribing))

        await asyncio.wait_for(settled(), timeout)

    def on_connect(self, callback: OnConnect) -> None:
        """Run ``callback(bus)`` after every (re)connection and resubscription."""
        self._on_connect.append(callback)

    def subscribe(
        self,
        pattern: str,
        model: type[M],
        handler: Handler[M],
        *,
        qos: int = 1,
        share_group: str | None = None,
    ) -> None:
        """Route messages matching ``pattern`` to ``handler(model_instance, incoming)``."""
        kind = _kind(pattern)
        if kind in ("+", "#"):
            kind = "any"
        sub = _Subscription(pattern, model, handler, qos, share_group, kind, pattern.split("/"))
        sub.received = self.metrics.received.labels(self.service, kind)
        sub.seconds = self.metrics.handle_seconds.labels(self.service, kind)
        self._subs.append(sub)
        self._routes.clear()
        client = self._client
        if client is not None and self.connected:
            task = asyncio.get_running_loop().create_task(
                self._subscribe_one(client, sub), name=f"bus-subscribe-{pattern}"
            )
            self._subscribing.add(task)
            task.add_done_callback(self._subscribing.discard)
            task.add_done_callback(_log_task_error)

    async def publish(
        self,
        topic: str,
        message: BaseModel | bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 10.0,
    ) -> None:
        """Publish and, at QoS 1, wait for the broker's PUBACK.

        Raises :class:`BusUnavailable` when not connected or the broker did not
        acknowledge in time: the message was not delivered and the caller decides;
        :class:`PublishRefused` (a ``BusUnavailable``) when the broker refused it.
        """
        link = self._link
        if link is None or not self.connected:
            raise BusUnavailable(f"not connected to {self.node}", kind="disconnected")
        payload = message if isinstance(message, bytes) else _encode(message)
        try:
            await link.publish(topic, payload, qos, retain, timeout)
        except _mqtt_fast.Refused as exc:
            self.metrics.publish_failures.labels(self.service, _kind(topic)).inc()
            raise PublishRefused(f"publish to {topic} {exc}", kind="refused") from exc
        except aiomqtt.MqttError as exc:
            raise BusUnavailable(f"publish to {topic} failed: {exc}", kind="publish") from exc
        self._published_counter(topic).inc()

    def publish_nowait(
        self,
        topic: str,
        message: BaseModel | bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        after: AckGroup | None = None,
    ) -> None:
        """Hand a message to the connection and return at once (see the module docstring).

        Raises :class:`BusUnavailable` when not connected; the PUBACK (or the failure,
        reported to :meth:`on_publish_failed` callbacks) comes later. With ``after``,
        the group's received messages wait for this one's confirmation.
        """
        link = self._link
        if link is None or not self.connected:
            raise BusUnavailable(f"not connected to {self.node}", kind="disconnected")
        payload = message if isinstance(message, bytes) else _encode(message)
        self._unconfirmed += 1
        self._idle.clear()
        if after is not None:
            after._published()
        link.publish_nowait(topic, payload, qos, retain, (topic, payload, after))

    def on_publish_failed(self, callback: OnPublishFailed) -> None:
        """Call ``callback(topic, payload, reason)`` for every unconfirmed ``publish_nowait``."""
        self._on_publish_failed.append(callback)

    @property
    def unconfirmed(self) -> int:
        """``publish_nowait`` messages neither confirmed nor failed yet."""
        return self._unconfirmed

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every ``publish_nowait`` so far is confirmed or failed."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Bus:
        self._owner = asyncio.current_task()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"bus-{self.service}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
        if self.taken_over is not None:
            raise self.taken_over

    def _give_up(self, how: str) -> None:
        """Another process uses our client id: cancel the task that entered the bus, whose
        ``async with`` then raises :class:`ClientIdInUse` (exit 2)."""
        self.taken_over = ClientIdInUse(
            f"MQTT client id {self.client_id!r} is in use by another process ({how}): "
            "run one process per id, or give each its own PFM_MQTT_CLIENT_ID"
        )
        log.error("%s", self.taken_over, extra={"service": self.service})
        if self._owner is not None and not self._owner.done():
            self._owner.cancel()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._connected.clear()
        self.metrics.bus_connected.labels(self.service).set(0)

    # -- internals -----------------------------------------------------------------

    def _make_client(self, protocol: aiomqtt.ProtocolVersion) -> aiomqtt.Client:
        target = self.settings.mqtt(self._node)
        tls_params = None
        if target.tls or self.settings.mqtt_ca_file:
            tls_params = aiomqtt.TLSParameters(
                ca_certs=str(self.settings.mqtt_ca_file) if self.settings.mqtt_ca_file else None,
                certfile=str(self.settings.mqtt_cert_file)
                if self.settings.mqtt_cert_file
                else None,
                keyfile=str(self.settings.mqtt_key_file) if self.settings.mqtt_key_file else None,
            )
        will = None
        if self._will is not None:
            will = aiomqtt.Will(self._will[0], self._will[1], qos=1, retain=True)
        kwargs: dict[str, Any] = {}
        if protocol == aiomqtt.ProtocolVersion.V5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = (
                self.settings.mqtt_session_expiry_s if self._persistent else 0
            )
            kwargs["properties"] = props
            kwargs["clean_start"] = not self._persistent
        else:
            kwargs["clean_session"] = not self._persistent
        client = aiomqtt.Client(
            target.host,
            target.port,
            username=target.username,
            password=target.password,
            identifier=self.client_id,
            protocol=protocol,
            will=will,
            keepalive=self.settings.mqtt_keepalive_s,
            tls_params=tls_params,
            timeout=10,
            max_inflight_messages=self._max_inflight,
            logger=logging.getLogger("aiomqtt"),
            **kwargs,
        )
        client.pending_calls_threshold = 1_000_000
        return client

    async def _run(self) -> None:
        attempt = 0
        tried_v311 = False
        connected_at = 0.0
        quick_drops = 0
        while True:
            protocol = self._protocol or aiomqtt.ProtocolVersion.V5
            client = self._make_client(protocol)
            link = _mqtt_fast.make_link(
                client,
                manual_ack=self._manual_ack,
                on_published=self._confirmed,
                on_failed=self._failed,
                fast=self.settings.mqtt_fast,
            )
            try:
                async with client:
                    link.start()
                    self._protocol = protocol
                    self._client = client
                    self._link = link
                    self.connections += 1
                    if self.connections > 1:
                        self.metrics.bus_reconnects.labels(self.service).inc()
                    for sub in self._subs:
                        await self._subscribe_one(client, sub)
                    self._connected.set()
                    connected_at = time.monotonic()
                    self.metrics.bus_connected.labels(self.service).set(1)
                    log.info(
                        "connected to %s (MQTT %s)",
                        self.node,
                        self.protocol,
                        extra={"service": self.service},
                    )
                    attempt = 0
                    for callback in self._on_connect:
                        await callback(self)
                    await self._receive(link)
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
                was_connected = self.connected
                self._connected.clear()
                self.metrics.bus_connected.labels(self.service).set(0)
                if was_connected and _taken_over(exc):
                    self._give_up("the broker said: session taken over")
                    return
                if was_connected and time.monotonic() - connected_at < _QUICK_DROP_S:
                    quick_drops += 1
                    if quick_drops >= _QUICK_DROPS:
                        self._give_up(
                            f"{quick_drops} connections in a row were closed by the broker "
                            f"within {_QUICK_DROP_S:g} s of connecting"
                        )
                        return
                else:
                    quick_drops = 0
                if (
                    self.settings.mqtt_protocol == "auto"
                    and not was_connected
                    and protocol == aiomqtt.ProtocolVersion.V5
                    and self.connections == 0
                    and not tried_v311
                    and _looks_like_protocol_refusal(exc)
                ):
                    # an MQTT 3.1.1-only broker: try the older protocol straight away
                    tried_v311 = True
                    self._protocol = aiomqtt.ProtocolVersion.V311
                    log.info("broker refused MQTT v5 (%s); using 3.1.1", exc)
                    continue
                if self.connections == 0 and tried_v311 and not was_connected:
                    self._protocol = None  # keep trying both until one works
                    tried_v311 = False
                lost = self.node
                if self._nodes > 1:
                    # a clustered broker: the next node has the same session
                    self._node = (self._node + 1) % self._nodes
                    if was_connected:
                        attempt = 0
                delay = self._backoff.delay(attempt)
                # a full round of the nodes failed before the backoff grows
                if self._node == 0 or self._nodes == 1:
                    attempt += 1
                log.warning(
                    "broker %s %s: %s; retrying%s in %.1f s",
                    lost,
                    "lost" if was_connected else "unreachable",
                    exc,
                    f" on {self.node}" if self._nodes > 1 else "",
                    delay,
                    extra={"service": self.service},
                )
                await asyncio.sleep(delay)
            finally:
                link.close()
                self._client = None
                self._link = None

    async def _subscribe_one(self, client: aiomqtt.Client, sub: _Subscription[Any]) -> None:
        granted = await client.subscribe(sub.filter, qos=sub.qos)
        codes = [c if isinstance(c, int) else c.value for c in granted]
        if any(code >= 0x80 for code in codes):
            # the broker refused the filter (its ACL, or a limit such as NATS's 65,535
            # QoS 1 messages in flight per session): nothing would arrive for it, so this
            # connection is not good; say so and try again with the backoff
            self.metrics.handler_errors.labels(self.service, "subscribe").inc()
            log.error(
                "broker %s refused the subscription %s (SUBACK 0x%02x)",
                self.node,
                sub.filter,
                max(codes),
                extra={"service": self.service, "topic": sub.filter},
            )
            raise aiomqtt.MqttError(
                f"subscription {sub.filter} refused by the broker (SUBACK 0x{max(codes):02x})"
            )
        log.debug("subscribed %s", sub.filter, extra={"service": self.service})

    async def _receive(self, link: _mqtt_fast.Link) -> None:
        """Dispatch every message of every batch the connection reads, until it drops."""
        ack = _acker(link) if self._manual_ack else None
        dispatch = self._dispatch
        while True:
            for topic, payload, qos, retain, mid in await link.next_batch():
                await dispatch(Incoming(topic, payload, qos, retain, mid, ack))

    def _route(self, topic: str) -> _Subscription[Any] | None:
        """The first subscription whose pattern matches ``topic`` (cached per topic)."""
        try:
            return self._routes[topic]
        except KeyError:
            pass
        if len(self._routes) >= _MAX_ROUTES:
            self._routes.clear()
        sub = next((s for s in self._subs if topic_matches(s.parts, topic)), None)
        self._routes[topic] = sub
        return sub

    async def _dispatch(self, incoming: Incoming) -> None:
        sub = self._route(incoming.topic)
        if sub is None:
            incoming.ack()
            return
        started = time.perf_counter()
        sub.received.inc()
        try:
            model = sub.model.model_validate_json(incoming.payload)
        except ValidationError as exc:
            # a message may keep what is sound (a reading without its implausible values)
            salvage = getattr(sub.model, "salvage", None)
            kept = salvage(incoming.payload, exc) if salvage is not None else None
            reason = describe_error(exc) if kept is None else kept[1]
            delivered = await self.dead_letter(incoming.topic, incoming.payload, reason, sub.kind)
            if kept is None:
                if delivered:
                    incoming.ack()  # else (broker gone) it is re-delivered and tried again
                return
            model = kept[0]
        try:
            await sub.handler(model, incoming)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.metrics.handler_errors.labels(self.service, sub.kind).inc()
            log.exception(
                "handler for %s failed",
                incoming.topic,
                extra={"service": self.service, "topic": incoming.topic},
            )
            incoming.ack()
        else:
            if not self._manual_ack:
                incoming.ack()
        sub.seconds.observe(time.perf_counter() - started)

    def _published_counter(self, topic: str) -> Any:
        kind = _kind(topic)
        counter = self._published.get(kind)
        if counter is None:
            counter = self._published[kind] = self.metrics.published.labels(self.service, kind)
        return counter

    def _confirmed(self, token: tuple[str, bytes, AckGroup | None]) -> None:
        self._published_counter(token[0]).inc()
        self._settle()
        if token[2] is not None:
            token[2]._settled(True)

    def _failed(self, token: tuple[str, bytes, AckGroup | None], reason: str) -> None:
        topic, payload, group = token
        self.metrics.publish_failures.labels(self.service, _kind(topic)).inc()
        log.warning(
            "publish to %s not confirmed: %s",
            topic,
            reason,
            extra={"service": self.service, "topic": topic, "reason": reason},
        )
        for callback in self._on_publish_failed:
            try:
                callback(topic, payload, reason)
            except Exception:
                log.exception("publish-failed callback raised", extra={"service": self.service})
        self._settle()
        if group is not None:
            # a refusal is final (the broker's ACL or quota): the inputs are acknowledged
            group._settled(is_refusal(reason))

    def _settle(self) -> None:
        self._unconfirmed -= 1
        if self._unconfirmed <= 0:
            self._unconfirmed = 0
            self._idle.set()

    async def dead_letter(self, topic: str, payload: bytes, reason: str, kind: str) -> bool:
        """Publish ``payload`` (received on ``topic``) to the dead-letter topic with
        ``reason``; count it under ``kind`` (a fixed label, never a name from the input)
        and log it (rate-limited, quoting at most a few hundred characters).

        True when the letter is with the broker (or the broker refused it for good),
        False when it could not be delivered: leave the input unacknowledged then.
        """
        self.metrics.deadletters.labels(self.service, kind).inc()
        log.warning(
            "dead-lettered a %s message from %s: %s",
            kind,
            topic,
            reason,
            extra={"service": self.service, "topic": topic, "reason": reason},
        )
        try:
            site = topics.parse(topic).site
        except Exception:
            site = self.site
        self._dl_seq += 1
        letter = DeadLetter.of(
            site=site,
            service=self.service,
            topic=topic,
            reason=reason,
            payload=payload,
            seq=self._dl_seq,
        )
        try:
            await self.publish(topics.deadletter(site, self.service), letter)
        except PublishRefused as exc:
            log.error("dead letter refused: %s", exc, extra={"service": self.service})
        except BusUnavailable as exc:
            log.error("could not publish dead letter: %s", exc, extra={"service": self.service})
            return False
        return True


def _acker(link: _mqtt_fast.Link) -> Callable[[Incoming], None]:
    """``Incoming.ack`` for messages of this connection only: a later one never acks them."""

    def ack(incoming: Incoming) -> None:
        link.ack(incoming.mid, incoming.qos)

    return ack


def is_refusal(reason: str) -> bool:
    """Whether a failed publish's ``reason`` is the broker's refusal (final: its ACL or
    quota), not a lost connection or a timeout."""
    return reason.startswith(_mqtt_fast.REFUSED)


def _encode(message: BaseModel) -> bytes:
    return orjson.dumps(message.model_dump(mode="json", by_alias=True))


def _looks_like_protocol_refusal(exc: aiomqtt.MqttError) -> bool:
    text = str(exc).lower()
    if isinstance(exc, MqttConnectError):
        return True
    return "protocol" in text or "disconnected" in text or "timed out" in text


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("bus task %s failed: %s", task.get_name(), task.exception())
