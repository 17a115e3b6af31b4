"""Code every pfmon service imports: message schemas, topics, settings, bus, metrics, logging.

Modules:
    errors        one root exception and its three kinds
    measurements  the single measurement vocabulary (name, unit, description)
    topics        build and parse ``pfm/v1/...`` topics; slug validation
    messages      pydantic models of every bus message, orjson encoding
    settings      process settings (``PFM_*`` environment variables)
    site          the site YAML file (meters, buses, rules, thresholds) and its loader
    bus           the MQTT bus (aiomqtt) with typed handlers and dead-lettering
    spool         bounded on-disk FIFO used when a peer is down
    metrics       per-service Prometheus registry and ``/metrics`` server
    logs          JSON / readable log setup
    service       signal handling and the run loop every service uses
    embedded      private Mosquitto / PostgreSQL for the demo and tests
"""

__version__ = "0.1.0"
