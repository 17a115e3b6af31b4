"""The bus's wire under aiomqtt: the ONE module that reaches into aiomqtt/paho internals.

Why: with aiomqtt 2.5 / paho 2.2 a received message costs far more in the client than
in our code - paho reads the fixed header one ``recv`` per byte, builds a v5
``Properties`` object and an ``MQTTMessage`` per packet, aiomqtt reads one packet per
event-loop pass and wakes the consumer through a queue and a task per message; a
publish costs a ``MQTTMessageInfo`` (with a ``threading.Condition``), an
``asyncio.Event``, a future and a cross-thread wake-up.

:class:`FastLink` keeps aiomqtt for everything else (connect, TLS, will, subscribe,
keepalive, disconnect) but owns the socket's read side:

* one ``recv`` of up to 256 KiB per readable event, every complete packet in it parsed;
* PUBLISH at QoS 0/1 decoded here (topic, mid, v5 properties skipped - the bus reads
  none - payload), handed to the bus as tuples in one batch per read;
* PUBACKs (automatic ones and :meth:`ack` calls) gathered and written as one buffer
  per event-loop pass, through paho's own output queue so packets never interleave;
* :meth:`publish_nowait`: PUBLISH packets built here, mids from paho's generator, a
  window of in-flight messages, PUBACKs counted by callback instead of a future;
* every other packet (CONNACK, SUBACK, QoS 2, PINGRESP, paho's own PUBACKs ...) goes
  to paho's normal handler, so aiomqtt behaves as before.

Both links make awaited publishes through paho with the mid kept (:class:`_Awaited`),
so a PUBACK's failure reason code (MQTT v5: 0x87 "not authorised" from the broker's
ACL) raises :class:`Refused` instead of passing for a delivery, as aiomqtt 2.5's
``publish`` would.

:func:`make_link` checks the installed versions (exactly aiomqtt 2.5.1, paho 2.2.0; TCP or
TLS transport) and otherwise returns a :class:`PlainLink`: aiomqtt's message iterator,
paho's ``ack`` and one task per ``publish_nowait``: same contract, plain speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from importlib.metadata import version
from typing import Any, Protocol

import aiomqtt
import paho.mqtt.client as paho_client
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket

log = logging.getLogger(__name__)

#: what a received message is handed on as: (topic, payload, qos, retain, mid)
Received = tuple[str, bytes, int, bool, int]
#: what the caller attaches to a publish, given back by the outcome callbacks
Token = Any
OnPublished = Callable[[Token], None]
OnFailed = Callable[[Token, str], None]

#: the exact releases whose internals this module was written and tested against
SUPPORTED = {"aiomqtt": "2.5.1", "paho-mqtt": "2.2.0"}
_READ_SIZE = 256 * 1024
_PUBLISH, _PUBACK = 0x30, 0x40
_MAX_TOPIC_CACHE = 10_000
#: messages handed on per event-loop pass at most
_BATCH = 500


class Link(Protocol):
    """One connection's receive, acknowledge and non-blocking publish."""

    def start(self) -> None: ...
    async def next_batch(self) -> list[Received]: ...
    def ack(self, mid: int, qos: int) -> None: ...
    def publish_nowait(
        self, topic: str, payload: bytes, qos: int, retain: bool, token: Token
    ) -> None: ...
    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, timeout: float
    ) -> None: ...
    def close(self) -> None: ...


class Refused(aiomqtt.MqttError):
    """The broker answered the publish with a failure reason code (MQTT v5, >= 0x80)."""

    def __init__(self, reason: int):
        super().__init__(f"refused by the broker (reason code {reason:#04x})")
        self.reason = reason


class _Gone(aiomqtt.MqttError):
    """The connection closed before the broker answered."""


class _Awaited:
    """Awaited publishes that learn the PUBACK's reason code.

    aiomqtt 2.5's ``publish`` returns normally whatever the reason code, so a publish
    the broker refused (MQTT v5: 0x87 not authorised by the ACL, 0x97 quota ...) would
    count as delivered. This wraps paho's ``on_publish`` (aiomqtt's own handler still
    runs) and publishes through paho, keeping the mid to match the answer.
    """

    def __init__(self, client: aiomqtt.Client):
        self._paho: paho_client.Client = client._client
        self._aio = client
        self._waiting: dict[int, asyncio.Future[int]] = {}
        inner: Callable[..., None] | None = self._paho.on_publish  # aiomqtt's (API v2)

        def on_publish(c: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            fut = self._waiting.pop(mid, None)
            if fut is not None and not fut.done():
                fut.set_result(int(getattr(reason, "value", 0)))
            if inner is not None:
                inner(c, userdata, mid, reason, props)

        self._paho.on_publish = on_publish

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, timeout: float
    ) -> None:
        """Publish; at QoS > 0 wait for the broker's answer. Raises :class:`Refused`,
        or ``MqttError`` when not sent, not answered in ``timeout`` or disconnected."""
        info = self._paho.publish(topic, payload, qos, retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if qos == 0 or info.is_published():
            return
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[info.mid] = fut
        try:
            reason = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise aiomqtt.MqttError(f"no acknowledgement within {timeout:g} s") from None
        finally:
            self._waiting.pop(info.mid, None)
        if reason >= 0x80:
            raise Refused(reason)

    def fail_all(self, why: str) -> None:
        waiting = list(self._waiting.values())
        self._waiting.clear()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(_Gone(why))


def fast_supported(client: aiomqtt.Client) -> str | None:
    """None when :class:`FastLink` fits this client, else why not."""
    for dist, wanted in SUPPORTED.items():
        found = version(dist)
        if found != wanted:
            return f"{dist} {found} is not {wanted}, the release the fast path was tested with"
    transport = getattr(client._client, "_transport", None)
    if transport not in ("tcp",):
        return f"transport {transport!r}"
    return None


def make_link(
    client: aiomqtt.Client,
    *,
    manual_ack: bool,
    on_published: OnPublished,
    on_failed: OnFailed,
    fast: bool = True,
) -> Link:
    """A :class:`FastLink` when the installed versions allow, else a :class:`PlainLink`.

    Call before ``async with client`` (the fast link hooks the socket at connection).
    """
    if manual_ack:
        client._client.manual_ack_set(True)
    why = fast_supported(client) if fast else "disabled by settings"
    if why is None:
        return FastLink(
            client, manual_ack=manual_ack, on_published=on_published, on_failed=on_failed
        )
    log.info("MQTT fast path off (%s): plain aiomqtt", why)
    return PlainLink(client, on_published=on_published, on_failed=on_failed)


class PlainLink:
    """The same contract on aiomqtt's public API (and paho's ``ack``)."""

    def __init__(self, client: aiomqtt.Client, *, on_published: OnPublished, on_failed: OnFailed):
        self._client = client
        self._on_published = on_published
        self._on_failed = on_failed
        self._tasks: dict[asyncio.Task[None], None] = {}  # in order: failures reported so
        self._closed = False
        self._awaited = _Awaited(client)

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, timeout: float
    ) -> None:
        await self._awaited.publish(topic, payload, qos, retain, timeout)

    def start(self) -> None:
        self._messages = self._client.messages

    async def next_batch(self) -> list[Received]:
        msg = await self._messages.__anext__()
        raw = msg.payload
        payload = raw if isinstance(raw, bytes) else str(raw if raw is not None else "").encode()
        return [(msg.topic.value, payload, msg.qos, bool(msg.retain), msg.mid)]

    def ack(self, mid: int, qos: int) -> None:
        if not self._closed and qos > 0:
            self._client._client.ack(mid, qos)

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int, retain: bool, token: Token
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._publish(topic, payload, qos, retain, token), name=f"bus-publish-{topic}"
        )
        self._tasks[task] = None
        task.add_done_callback(self._forget)

    async def _publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, token: Token
    ) -> None:
        try:
            await self._awaited.publish(topic, payload, qos, retain, self._client.timeout)
        except asyncio.CancelledError:
            self._on_failed(token, "disconnected")
            raise
        except (Refused, _Gone) as exc:
            self._on_failed(token, str(exc))
        except aiomqtt.MqttError as exc:
            self._on_failed(token, f"publish failed: {exc}")
        else:
            self._on_published(token)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    def close(self) -> None:
        self._closed = True
        self._awaited.fail_all("disconnected")
        for task in list(self._tasks):
            task.cancel()


class FastLink:
    """Owns the read side of one aiomqtt connection; see the module docstring."""

    def __init__(
        self,
        client: aiomqtt.Client,
        *,
        manual_ack: bool,
        on_published: OnPublished,
        on_failed: OnFailed,
    ) -> None:
        self._aio = client
        self._paho: paho_client.Client = client._client
        self._loop = asyncio.get_running_loop()
        self._manual_ack = manual_ack
        self._on_published = on_published
        self._on_failed = on_failed
        self._v5 = self._paho._protocol == MQTTProtocolVersion.MQTTv5
        self._parts: list[bytes] = []  # an incomplete packet's bytes so far
        self._have = 0
        self._need = 0  # bytes the incomplete packet needs in all (0: not known yet)
        self._ready: list[Received] = []
        self._waiter: asyncio.Future[None] | None = None
        self._acks = bytearray()
        self._out = bytearray()
        self._flush_scheduled = False
        self._inflight: dict[int, Token] = {}
        self._backlog: deque[tuple[str, bytes, int, bool, Token]] = deque()
        self._topics: dict[bytes, str] = {}
        self._closed = False
        self._paho.on_socket_open = self._on_socket_open
        self._paho.on_message = self._on_paho_message
        self._awaited = _Awaited(client)

    async def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool, timeout: float
    ) -> None:
        """An awaited publish: paho sends it, its PUBACK goes to paho's handler."""
        await self._awaited.publish(topic, payload, qos, retain, timeout)

    # -- connection -------------------------------------------------------------------

    def _on_socket_open(self, _client: Any, _userdata: Any, sock: Any) -> None:
        # paho calls this on aiomqtt's connect thread; the rest runs on the loop
        self._loop.call_soon_threadsafe(self._install, sock.fileno())

    def _install(self, fd: int) -> None:
        """What aiomqtt's ``_on_socket_open`` does, with our reader instead of ``loop_read``."""
        self._loop.add_reader(fd, self._on_readable)
        self._aio._misc_task = self._loop.create_task(self._aio._misc_loop())

    def start(self) -> None:
        """Once connected: learn of the disconnection (to wake the reader and fail publishes)."""
        self._aio._disconnected.add_done_callback(self._on_disconnected)

    def _on_disconnected(self, _fut: asyncio.Future[None]) -> None:
        self.close()
        self._wake()

    def close(self) -> None:
        """No more acks on this connection (the broker re-delivers); fail what is unconfirmed."""
        if self._closed:
            return
        self._closed = True
        self._awaited.fail_all("disconnected")
        failed = list(self._inflight.values()) + [item[4] for item in self._backlog]
        self._inflight.clear()
        self._backlog.clear()
        for token in failed:
            self._on_failed(token, "disconnected")

    def _lost(self, rc: MQTTErrorCode) -> None:
        """paho's own reaction to a read error: close the socket, call on_disconnect."""
        self._paho._loop_rc_handle(rc)
        self._wake()

    # -- receive ----------------------------------------------------------------------

    async def next_batch(self) -> list[Received]:
        """Up to :data:`_BATCH` messages received; raises ``MqttError`` once disconnected.

        Always gives the event loop a pass first: a backlog read in one go (a persistent
        session's queue arrives while the bus still subscribes) must not starve the
        other tasks - the archiver's writer among them - while it is handled.
        """
        if self._ready:
            await asyncio.sleep(0)
        while not self._ready:
            disconnected = self._aio._disconnected
            if disconnected.done():
                exc = None if disconnected.cancelled() else disconnected.exception()
                raise aiomqtt.MqttError("Disconnected during message iteration") from exc
            self._waiter = self._loop.create_future()
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

    def _on_readable(self) -> None:
        paho = self._paho
        try:
            while True:
                try:
                    data = paho._sock_recv(_READ_SIZE)
                except BlockingIOError:
                    break
                if not data:
                    self._lost(MQTTErrorCode.MQTT_ERR_CONN_LOST)
                    return
                self._take(data)
                pending = getattr(paho._sock, "pending", None)  # TLS keeps decrypted bytes
                if pending is None or not pending():
                    break
        except OSError as exc:
            log.debug("MQTT read failed: %s", exc)
            self._lost(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            return
        except _ProtocolError as exc:
            log.error("MQTT protocol error from the broker: %s", exc)
            self._lost(MQTTErrorCode.MQTT_ERR_PROTOCOL)
            return
        with paho._msgtime_mutex:
            paho._last_bytes_received = paho_client.time_func()
        if self._acks:
            self._flush()
        if self._ready:
            self._wake()

    def _take(self, data: bytes) -> None:
        """Add ``data`` to an incomplete packet (joined only once it is whole), then parse."""
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._need and self._have < self._need:
                return
            data = b"".join(self._parts)
            self._parts.clear()
        rest = self._parse(data)
        if rest:
            self._parts.append(rest)
            self._have = len(rest)
            self._need = _packet_size(rest)

    def _parse(self, buf: bytes) -> bytes:
        """Handle every complete packet in ``buf``; returns the incomplete tail."""
        end = len(buf)
        pos = 0
        ready = self._ready
        topics = self._topics
        v5 = self._v5
        auto_ack = not self._manual_ack
        acks = self._acks
        while end - pos >= 2:
            header = buf[pos]
            length = buf[pos + 1]
            body = pos + 2
            if length & 0x80:
                head = _fixed_header(buf, pos)
                if head is None:
                    break
                body, length = head
            stop = body + length
            if stop > end:
                break
            kind = header & 0xF0
            if kind == _PUBLISH and header & 0x06 != 0x04:  # QoS 0 or 1
                t1 = body + 2 + ((buf[body] << 8) | buf[body + 1]) if length >= 2 else stop + 1
                if t1 + (header & 0x02) > stop:  # QoS 1: two bytes of packet id
                    raise _ProtocolError("PUBLISH shorter than its topic and packet id")
                topic_b = buf[body + 2 : t1]
                topic = topics.get(topic_b)
                if topic is None:
                    topic = self._topic(topic_b)
                if header & 0x02:
                    mid = (buf[t1] << 8) | buf[t1 + 1]
                    p = t1 + 2
                    if auto_ack:
                        acks += b"\x40\x02" + buf[t1 : t1 + 2]
                else:
                    mid = 0
                    p = t1
                if v5:
                    p = _skip_properties(buf, p, stop)
                ready.append((topic, buf[p:stop], (header >> 1) & 3, bool(header & 1), mid))
            elif (
                kind == _PUBACK
                and length >= 2
                and (buf[body] << 8 | buf[body + 1]) in self._inflight
            ):
                self._confirm((buf[body] << 8) | buf[body + 1], buf[body + 2] if length > 2 else 0)
            else:
                self._delegate(header, buf[body:stop])
            pos = stop
        return buf[pos:]

    def _topic(self, raw: bytes) -> str:
        if len(self._topics) >= _MAX_TOPIC_CACHE:
            self._topics.clear()
        try:
            topic = raw.decode()
        except UnicodeDecodeError as exc:
            raise _ProtocolError(f"PUBLISH topic is not UTF-8: {exc}") from None
        self._topics[raw] = topic
        return topic

    def _delegate(self, header: int, body: bytes) -> None:
        """A packet the fast path does not handle: paho's own handler, as ``loop_read`` would."""
        paho = self._paho
        paho._in_packet = _in_packet(header, bytearray(body))
        try:
            rc = paho._packet_handle()
        except MalformedPacket as exc:
            raise _ProtocolError(str(exc)) from exc
        finally:
            paho._in_packet = _in_packet(0, bytearray())
        if rc == MQTTErrorCode.MQTT_ERR_PROTOCOL:
            raise _ProtocolError(f"packet type {header >> 4} refused by paho")
        if rc > 0:
            raise OSError(f"paho: {paho_client.error_string(rc)}")

    def _on_paho_message(self, _client: Any, _userdata: Any, msg: paho_client.MQTTMessage) -> None:
        """QoS 2 messages (paho runs their handshake) join the same batches."""
        self._ready.append((msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.mid))

    # -- acknowledge and publish --------------------------------------------------------

    def ack(self, mid: int, qos: int) -> None:
        """Queue the PUBACK (written once per loop pass); dropped once this connection is gone."""
        if self._closed or self._paho._sock is None:
            return
        if qos == 1:
            self._acks += b"\x40\x02" + mid.to_bytes(2, "big")
            self._schedule_flush()
        elif qos == 2:
            self._paho.ack(mid, qos)

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int, retain: bool, token: Token
    ) -> None:
        """Queue a PUBLISH; ``on_published(token)`` on its PUBACK (QoS 0: once queued)."""
        if self._closed:
            self._on_failed(token, "disconnected")
            return
        if qos == 0:
            self._out += self._publish_packet(topic, payload, 0, retain, 0)
            self._schedule_flush()
            self._on_published(token)
            return
        self._backlog.append((topic, payload, qos, retain, token))
        self._pump()

    @property
    def unconfirmed(self) -> int:
        return len(self._inflight) + len(self._backlog)

    def _window(self) -> int:
        limit = self._paho._max_inflight_messages or 65_000
        return limit - len(self._inflight) - self._paho._inflight_messages

    def _pump(self) -> None:
        """Move queued publishes onto the wire while the in-flight window allows."""
        backlog = self._backlog
        room = self._window()
        if room <= 0 or not backlog:
            return
        while backlog and room > 0:
            topic, payload, qos, retain, token = backlog.popleft()
            mid = self._new_mid()
            self._inflight[mid] = token
            self._out += self._publish_packet(topic, payload, qos, retain, mid)
            room -= 1
        self._schedule_flush()

    def _new_mid(self) -> int:
        taken = self._paho._out_messages
        while True:
            mid = self._paho._mid_generate()
            if mid not in self._inflight and mid not in taken:
                return mid

    def _publish_packet(
        self, topic: str, payload: bytes, qos: int, retain: bool, mid: int
    ) -> bytes:
        t = topic.encode()
        head = len(t).to_bytes(2, "big") + t
        if qos:
            head += mid.to_bytes(2, "big")
        if self._v5:
            head += b"\x00"  # no properties
        size = len(head) + len(payload)
        return bytes((_PUBLISH | qos << 1 | retain,)) + _varint(size) + head + payload

    def _confirm(self, mid: int, reason: int) -> None:
        token = self._inflight.pop(mid)
        if reason >= 0x80:
            self._on_failed(token, f"refused by the broker (reason code {reason:#04x})")
        else:
            self._on_published(token)
        if self._backlog:
            self._pump()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand the gathered PUBACKs and PUBLISHes to paho's output queue as one packet."""
        self._flush_scheduled = False
        data = bytes(self._acks + self._out)
        self._acks.clear()
        self._out.clear()
        paho = self._paho
        if not data or paho._sock is None:
            return
        # command 0: paho's writer runs no PUBLISH/DISCONNECT bookkeeping for it
        paho._out_packet.append(
            {
                "command": 0,
                "mid": 0,
                "qos": 0,
                "pos": 0,
                "to_process": len(data),
                "packet": data,
                "info": None,
            }
        )
        if paho._registered_write:
            return  # aiomqtt's writer is (about to be) registered: it writes this too
        with contextlib.suppress(Exception):
            paho.loop_write()  # now, not a loop pass later; errors reach on_disconnect


class _ProtocolError(Exception):
    """The broker sent bytes that are not MQTT."""


def _in_packet(command: int, packet: bytearray) -> Any:
    return {
        "command": command,
        "have_remaining": 1 if command else 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": len(packet),
        "packet": packet,
        "to_process": 0,
        "pos": 0,
    }


def _fixed_header(buf: bytes, pos: int) -> tuple[int, int] | None:
    """(body start, remaining length) of the packet at ``pos``; None while incomplete."""
    length = 0
    mult = 1
    for i in range(pos + 1, min(pos + 5, len(buf))):
        byte = buf[i]
        length += (byte & 0x7F) * mult
        if not byte & 0x80:
            return i + 1, length
        mult *= 128
    if len(buf) - pos >= 5:
        raise _ProtocolError("remaining length longer than 4 bytes")
    return None


def _packet_size(buf: bytes) -> int:
    """Whole size of the packet ``buf`` starts with; 0 while its header is incomplete."""
    head = _fixed_header(buf, 0)
    return 0 if head is None else head[0] + head[1]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _skip_properties(buf: bytes, pos: int, stop: int) -> int:
    """Position after the v5 property block at ``pos`` of a packet that ends at ``stop``."""
    if pos < stop:
        length = buf[pos]
        if not length & 0x80:
            end = pos + 1 + length
            if end <= stop:
                return end
            raise _ProtocolError("PUBLISH properties run past the packet")
    value = 0
    mult = 1
    for i in range(pos, min(pos + 4, stop)):
        byte = buf[i]
        value += (byte & 0x7F) * mult
        if not byte & 0x80:
            if i + 1 + value > stop:
                break
            return i + 1 + value
        mult *= 128
    raise _ProtocolError("PUBLISH properties malformed or past the packet")
