"""``pfmon init``: the command line over :func:`services.init.site.init_site`."""

from __future__ import annotations

from pathlib import Path

import typer

from services.init.site import init_site
from shared.errors import ConfigError


def register(app: typer.Typer) -> None:
    @app.command("init")
    def _init(
        site: str | None = typer.Option(
            None, "--site", help="Site slug ([a-z0-9_-]+); default: the site file's."
        ),
        site_file: Path | None = typer.Option(
            None,
            "--site-file",
            help="The site YAML: validated, gives the site and gateway names.",
        ),
        role: str = typer.Option(
            "site", "--role", help="site (one stack), edge (branch gateway) or central."
        ),
        out: Path = typer.Option(
            Path("deploy/secrets"), "--out", help="Folder for certificates, passwd, acl."
        ),
        env_file: Path | None = typer.Option(
            None,
            "--env-file",
            help="Compose .env to write (default: .env for a site, deploy/<role>/.env otherwise).",
        ),
        gateway: str | None = typer.Option(
            None, "--gateway", help="Gateway slug (default: the site file's, else gw1)."
        ),
        hostname: list[str] = typer.Option(
            [], "--hostname", help="Extra DNS name / IP of the broker (repeat). For TLS SANs."
        ),
        central: Path | None = typer.Option(
            None, "--central", help="Edge only: the centre's secrets folder (CA, passwd, acl)."
        ),
        central_host: str | None = typer.Option(
            None,
            "--central-host",
            help="Edge only: central broker host the bridge dials; the nodes of a clustered"
            " centre separated by commas (host or host:port).",
        ),
        central_port: int | None = typer.Option(
            None,
            "--central-port",
            help="Central broker port: 8883 (MQTT + TLS), 443 with --central-tunnel.",
        ),
        central_tunnel: str | None = typer.Option(
            None,
            "--central-tunnel",
            help="Edge only: reach the centre over WebSockets + TLS (its --websockets-port) "
            "through pfmon wss-tunnel at this HOST:PORT (compose: wss-tunnel:8884).",
        ),
        bridge_metrics: str = typer.Option(
            "all",
            "--bridge-metrics",
            help="Edge only: the metrics the bridge forwards: all (per reading and the "
            "aggregates), aggregates (3 s and 10 min only), one interval (600s) or batches "
            "(analytics' archive batches: every metrics message, many a message; needs "
            "analytics.archive_batches).",
        ),
        client_path: str = typer.Option(
            "/run/secrets/mqtt",
            "--client-path",
            help="Where a service finds its clients/<user>/ files, for env/<user>.env "
            "({user} is replaced, e.g. /etc/pfmon/secrets/clients/{user}).",
        ),
        broker_url: str | None = typer.Option(
            None,
            "--broker-url",
            help="URL services dial (env/<user>.env); default mqtts://mosquitto:8883, with "
            "--engine nats every node's mqtts://NODE:8883.",
        ),
        broker_path: str = typer.Option(
            "/mosquitto/secrets",
            "--broker-path",
            help="Where the broker sees the broker/ folder (paths in bridge.conf).",
        ),
        websockets_port: int | None = typer.Option(
            None,
            "--websockets-port",
            help="Also listen for MQTT over WebSockets + TLS on this port (443: for clients "
            "behind firewalls that pass only HTTPS; user + password, no client certificate).",
        ),
        engine: str = typer.Option(
            "mosquitto",
            "--engine",
            help="Central only: mosquitto (one broker) or nats (a NATS JetStream cluster: "
            "also writes its nodes' configurations and users in OUT/nats).",
        ),
        nats_node: list[str] = typer.Option(
            [],
            "--nats-node",
            help="With --engine nats: a node's host name (repeat; default nats1, nats2, "
            "nats3, the compose services). Named in the broker certificate.",
        ),
        days: int = typer.Option(3650, "--days", min=1, help="Certificate validity."),
        force: bool = typer.Option(False, "--force", help="Rotate: overwrite existing secrets."),
    ) -> None:
        """Generate a site's CA, broker and client certificates, passwords, ACL and .env."""
        from services.common import fail

        try:
            site, gateway, simulator = _names_from(site, site_file, gateway)
            result = init_site(
                site=site,
                site_file=site_file,
                simulator=simulator,
                role=role,  # type: ignore[arg-type]
                out=out,
                env_file=env_file,
                gateway=gateway,
                hostnames=hostname,
                central=central,
                central_host=central_host,
                central_port=central_port or (443 if central_tunnel else 8883),
                central_tunnel=central_tunnel,
                bridge_metrics=bridge_metrics,
                client_path=client_path,
                broker_url=broker_url,
                broker_path=broker_path,
                websockets_port=websockets_port,
                days=days,
                force=force,
                engine=engine,  # type: ignore[arg-type]
                nats_nodes=nats_node or None,
            )
        except ConfigError as exc:
            fail(str(exc))
        typer.echo(f"pfmon init: {role} secrets for site {site} in {result.out}")
        typer.echo(f"  compose variables (passwords): {result.env_file}")
        users = [u for u in result.passwords if not u.startswith("PFM_")]
        typer.echo(f"  broker users: {', '.join(users)}")
        for note in result.notes:
            typer.echo(f"  note: {note}")


def _names_from(
    site: str | None, site_file: Path | None, gateway: str | None
) -> tuple[str, str, bool]:
    """(site, gateway, uses the simulator) from the options and the site file."""
    if site_file is None:
        if site is None:
            raise ConfigError("pfmon init: pass --site NAME or --site-file FILE")
        return site, gateway or "gw1", False
    from shared.site import load_site

    config = load_site(site_file)
    if site is not None and site != config.site:
        raise ConfigError(
            f"pfmon init: --site {site!r} differs from site {config.site!r} in {site_file} "
            "(the broker ACL only allows the site file's topics)"
        )
    simulator = any(b.host == "simulator" for b in config.buses)
    return config.site, gateway or config.gateway, simulator
