"""A prototype of the bus's :class:`~shared._mqtt_fast.Link` on gmqtt, through its public API.

Not part of the product: ``bench/bench_bus.py`` measures it beside the bus's own wire,
and docs/bus.md records the comparison and why the bus does not use it. gmqtt is a dev
dependency (pinned in requirements.lock), not a runtime one.

gmqtt (0.8.0) reads the socket as an asyncio protocol: every complete packet of a read
is parsed and handed to ``on_message`` in one go, so a synchronous ``on_message`` that
appends to a list gives batches without touching gmqtt's internals. What it offers and
what it lacks, against what the bus needs (see docs/bus.md for the figures):

* connect (v5 and 3.1.1, v5 session expiry, clean start off), TLS (an ``SSLContext``),
  username/password, will, subscribe with SUBACK: yes;
* manual acknowledgement: only as "PUBACK when ``on_message`` returns" and only when
  ``on_message`` is a coroutine function (``optimistic_acknowledgement=False``); so a
  held message costs a task and a future here, resolved by :meth:`GmqttLink.ack`;
* publish confirmation: ``publish`` returns nothing and no callback reports a PUBACK;
  the one public hook is the ``persistent_storage`` object that gmqtt pushes each QoS
  1/2 packet to and removes it from on its PUBACK: the link plugs in its own to learn
  mids and confirmations. The PUBACK's reason code is ignored by gmqtt, so a publish
  the broker refused (v5 0x87 from its ACL) counts as delivered: :class:`Refused` is
  never raised here;
* gmqtt reconnects by itself (one attempt even after ``stop_reconnect()``) and replays
  its stored publishes; the bus reconnects with its own backoff and resubscribes, so
  the link sets a negative retry count, which stops gmqtt's own attempts.

:class:`GmqttBus` runs the bus's dispatch over this link (a prototype: subscriptions
are registered before entering; the TLS client certificate and the CA come from the
same settings as the bus's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from typing import Any

import aiomqtt
import gmqtt
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.storage import PersistentStorage

from shared._mqtt_fast import OnFailed, OnPublished, Received, Token
from shared.bus import Bus, _log_task_error
from shared.settings import Settings

log = logging.getLogger(__name__)

_BATCH = 500


class GmqttError(aiomqtt.MqttError):
    """The gmqtt connection failed or dropped (an ``MqttError``, as the bus expects)."""


class _Confirmations(PersistentStorage):  # type: ignore[misc]
    """gmqtt's store of unacknowledged publishes, used to learn mids and PUBACKs."""

    def __init__(self, on_acked: Any) -> None:
        super().__init__()
        self.last_mid = 0
        self._on_acked = on_acked

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        self.last_mid = mid

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        self._on_acked(mid)


class GmqttLink:
    """The bus's Link on one gmqtt connection."""

    def __init__(
        self,
        settings: Settings,
        *,
        client_id: str,
        protocol: str,
        persistent: bool,
        manual_ack: bool,
        will: tuple[str, bytes] | None,
        max_inflight: int,
        on_published: OnPublished,
        on_failed: OnFailed,
    ) -> None:
        self._settings = settings
        self._protocol = MQTTv311 if protocol == "3.1.1" else MQTTv50
        self._manual_ack = manual_ack
        self._max_inflight = max_inflight
        self._window = max_inflight
        self._on_published = on_published
        self._on_failed = on_failed
        self._ready: list[Received] = []
        self._waiter: asyncio.Future[None] | None = None
        self._held: dict[int, asyncio.Future[int]] = {}
        self._next_held = 0
        self._inflight: dict[int, Token] = {}
        self._awaited: dict[int, asyncio.Future[None]] = {}
        self._backlog: deque[tuple[str, bytes, int, bool, Token]] = deque()
        self._suback: dict[int, asyncio.Future[None]] = {}
        self._closed = False
        self._lost: BaseException | None = None
        self._store = _Confirmations(self._acked)
        kwargs: dict[str, Any] = {}
        if self._protocol == MQTTv50:
            kwargs["session_expiry_interval"] = settings.mqtt_session_expiry_s if persistent else 0
        will_message = None
        if will is not None:
            will_message = gmqtt.Message(will[0], will[1], qos=1, retain=True)
        self._client = gmqtt.Client(
            client_id,
            clean_session=not persistent,
            optimistic_acknowledgement=not manual_ack,
            will_message=will_message,
            persistent_storage=self._store,
            logger=logging.getLogger("gmqtt"),
            **kwargs,
        )
        # the bus reconnects (backoff, resubscription); gmqtt must not on its own
        self._client.set_config({"reconnect_retries": -2})
        self._client.on_message = self._on_message_held if manual_ack else self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        target = settings.mqtt()
        if target.username is not None:
            self._client.set_auth_credentials(target.username, target.password)

    # -- connection -------------------------------------------------------------------

    async def connect(self) -> None:
        target = self._settings.mqtt()
        tls: ssl.SSLContext | bool = False
        if target.tls or self._settings.mqtt_ca_file:
            tls = ssl.create_default_context(
                cafile=str(self._settings.mqtt_ca_file) if self._settings.mqtt_ca_file else None
            )
            if self._settings.mqtt_cert_file:
                tls.load_cert_chain(
                    str(self._settings.mqtt_cert_file),
                    str(self._settings.mqtt_key_file) if self._settings.mqtt_key_file else None,
                )
        try:
            await self._client.connect(
                target.host,
                target.port,
                ssl=tls,
                keepalive=self._settings.mqtt_keepalive_s,
                version=self._protocol,
            )
        except (OSError, gmqtt.MQTTConnectError) as exc:
            raise GmqttError(f"connect to {self._settings.mqtt_url}: {exc}") from exc

    async def subscribe(self, topic_filter: str, qos: int, timeout: float = 10) -> None:
        mid = self._client.subscribe(topic_filter, qos=qos)
        fut = self._suback[mid] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._suback.pop(mid, None)

    def _on_connect(self, _client: Any, _flags: Any, _rc: Any, props: dict[str, Any]) -> None:
        """gmqtt hands out at most the broker's Receive Maximum - 1 packet ids (v5
        CONNACK; mosquitto says 20): more publishes in flight raise ``OverflowError``.
        One id stays free for awaited publishes."""
        receive_max = (props.get("receive_maximum") or [65_535])[0]
        self._window = max(1, min(self._max_inflight, receive_max - 2))

    def _on_subscribe(self, _client: Any, mid: int, _qos: Any, _props: Any) -> None:
        fut = self._suback.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def disconnect(self) -> None:
        self.close()
        with contextlib.suppress(Exception):
            await self._client.disconnect()

    def _on_disconnect(self, _client: Any, _packet: Any, exc: Any = None) -> None:
        self._lost = exc if isinstance(exc, BaseException) else None
        self.close()
        self._wake()

    # -- the Link protocol ----------------------------------------------------------------

    def start(self) -> None:
        """Nothing to do: gmqtt reads from the connection on."""

    async def next_batch(self) -> list[Received]:
        if self._ready:
            await asyncio.sleep(0)
        while not self._ready:
            if self._closed:
                raise GmqttError("disconnected") from self._lost
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if len(self._ready) <= _BATCH:
            batch, self._ready = self._ready, []
        else:
            batch, self._ready = self._ready[:_BATCH], self._ready[_BATCH:]
        return batch

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_message(self, _c: Any, topic: str, payload: bytes, qos: int, props: Any) -> None:
        """Automatic acknowledgement: gmqtt sent the PUBACK already."""
        self._ready.append((topic, payload, qos, bool(props.get("retain")), 0))
        self._wake()

    async def _on_message_held(
        self, _c: Any, topic: str, payload: bytes, qos: int, props: Any
    ) -> int:
        """Manual acknowledgement: gmqtt sends the PUBACK when this returns."""
        self._next_held += 1
        key = self._next_held
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._held[key] = fut
        self._ready.append((topic, payload, qos, bool(props.get("retain")), key))
        self._wake()
        try:
            return await fut
        finally:
            self._held.pop(key, None)

    def ack(self, mid: int, qos: int) -> None:
        fut = self._held.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(0)

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int, retain: bool, token: Token
    ) -> None:
        if self._closed:
            self._on_failed(token, "disconnected")
            return
        if qos == 0:
            self._client.publish(topic, payload, qos=0, retain=retain)
            self._on_published(token)
            return
        self._backlog.append((topic, payload, qos, retain, token))
        self._pump()

    def _pump(self) -> None:
        while self._backlog and len(self._inflight) + len(self._awaited) < self._window:
            topic, payload, qos, retain, token = self._backlog.popleft()
            self._client.publish(topic, payload, qos=qos, retain=retain)
            self._inflight[self._store.last_mid] = token

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, timeout: float
    ) -> None:
        if self._closed:
            raise GmqttError("disconnected")
        self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return
        mid = self._store.last_mid
        fut = self._awaited[mid] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise GmqttError(f"no acknowledgement within {timeout:g} s") from None
        finally:
            self._awaited.pop(mid, None)

    def _acked(self, mid: int) -> None:
        token = self._inflight.pop(mid, None)
        if token is not None:
            self._on_published(token)
            if self._backlog:
                self._pump()
            return
        fut = self._awaited.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fut in self._awaited.values():
            if not fut.done():
                fut.set_exception(GmqttError("disconnected"))
        failed = list(self._inflight.values()) + [item[4] for item in self._backlog]
        self._inflight.clear()
        self._backlog.clear()
        for token in failed:
            self._on_failed(token, "disconnected")
        for held in self._held.values():
            held.cancel()  # no PUBACK: the broker delivers it again


class GmqttBus(Bus):
    """:class:`~shared.bus.Bus` with its connection on :class:`GmqttLink` (a prototype)."""

    async def _run(self) -> None:
        attempt = 0
        while True:
            protocol = "3.1.1" if self.settings.mqtt_protocol == "3.1.1" else "5"
            link = GmqttLink(
                self.settings,
                client_id=self.client_id,
                protocol=protocol,
                persistent=self._persistent,
                manual_ack=self._manual_ack,
                will=self._will,
                max_inflight=self._max_inflight,
                on_published=self._confirmed,
                on_failed=self._failed,
            )
            try:
                await link.connect()
                self._link = link
                self.connections += 1
                for sub in self._subs:
                    await link.subscribe(sub.filter, sub.qos)
                self._connected.set()
                self.metrics.bus_connected.labels(self.service).set(1)
                attempt = 0
                for callback in self._on_connect:
                    await callback(self)
                await self._receive(link)
            except (GmqttError, TimeoutError) as exc:
                self.last_error = str(exc)
                self._connected.clear()
                self.metrics.bus_connected.labels(self.service).set(0)
                delay = self._backoff.delay(attempt)
                attempt += 1
                log.warning("gmqtt link: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
            finally:
                self._link = None
                task = asyncio.get_running_loop().create_task(
                    link.disconnect(), name="gmqtt-disconnect"
                )
                task.add_done_callback(_log_task_error)
                self._disconnecting = task

    async def close(self) -> None:
        await super().close()
        task = getattr(self, "_disconnecting", None)
        if task is not None:
            with contextlib.suppress(Exception):
                await task
        # gmqtt schedules a reconnection task on every disconnection; let it see that
        # reconnecting is off and end, rather than be cancelled at loop shutdown
        for _ in range(3):
            await asyncio.sleep(0)
