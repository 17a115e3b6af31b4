"""Prometheus: one explicit registry per service, served at ``/metrics``.

Names follow Prometheus conventions: ``pfm_`` prefix, ``_total`` / ``_seconds`` /
``_bytes`` suffixes, few labels. ``promtool check metrics`` is clean (tested).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from threading import Thread
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import start_http_server

log = logging.getLogger(__name__)


@dataclass
class ServiceMetrics:
    """The metrics every service has; services add their own on ``registry``."""

    service: str
    site: str
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        self.info = Info("pfm_build", "pfmon build and service identity", registry=r)
        self.received = Counter(
            "pfm_messages_received_total",
            "Messages received from the bus, by kind",
            ["service", "kind"],
            registry=r,
        )
        self.published = Counter(
            "pfm_messages_published_total",
            "Messages published to the bus, by kind",
            ["service", "kind"],
            registry=r,
        )
        self.publish_failures = Counter(
            "pfm_publish_failures_total",
            "Publishes the broker refused (MQTT v5 reason code >= 0x80, e.g. its ACL), and"
            " non-blocking publishes it did not confirm before the connection dropped",
            ["service", "kind"],
            registry=r,
        )
        self.deadletters = Counter(
            "pfm_deadletters_total",
            "Messages that failed validation and went to the dead-letter topic",
            ["service", "kind"],
            registry=r,
        )
        self.handler_errors = Counter(
            "pfm_handler_errors_total",
            "Messages whose handler raised (a bug or a peer failure); the service carried on",
            ["service", "kind"],
            registry=r,
        )
        self.bus_connected = Gauge(
            "pfm_bus_connected", "1 while connected to the MQTT broker", ["service"], registry=r
        )
        self.bus_reconnects = Counter(
            "pfm_bus_reconnects_total",
            "Connection attempts to the broker after the first",
            ["service"],
            registry=r,
        )
        self.handle_seconds = Histogram(
            "pfm_handle_seconds",
            "Time to validate and handle one incoming message",
            ["service", "kind"],
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
            registry=r,
        )
        from shared import __version__

        self.info.info({"version": __version__, "service": self.service, "site": self.site})

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> tuple[Any, Thread] | None:
        """Serve ``/metrics`` on ``host:port`` (0 or None = off). Returns the server."""
        if not port:
            return None
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port, extra={"service": self.service})
        return server, thread
