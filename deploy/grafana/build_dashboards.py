"""Write the pfmon Grafana dashboards (``deploy/grafana/dashboards/*.json``).

The JSON files are committed (Grafana provisions them as they are); this script is
how they are made: edit a panel here and run ``python deploy/grafana/build_dashboards.py``.
Every query names a metric or a table/column that pfmon really produces (the rollups
``pfm_metrics_1m/15m/1h`` have the same time column ``ts`` as ``pfm_metrics``);
``tests/test_dashboards.py`` checks that against the code and the archiver's schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
PROM = {"type": "prometheus", "uid": "pfm-prometheus"}
SQL = {"type": "grafana-postgresql-datasource", "uid": "pfm-timescaledb"}
#: site-file defaults (shared/site/core.py Thresholds): pf_penalty, pf_alert
PF_PENALTY, PF_ALERT = 0.90, 0.97

Panel = dict[str, Any]


def prom(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    t: dict[str, Any] = {"refId": ref, "datasource": PROM, "expr": expr, "legendFormat": legend}
    if instant:
        t["instant"] = True
        t["range"] = False
    return t


def sql(query: str, ref: str = "A", fmt: str = "time_series") -> dict[str, Any]:
    return {
        "refId": ref,
        "datasource": SQL,
        "format": fmt,
        "rawQuery": True,
        "editorMode": "code",
        "rawSql": " ".join(query.split()),
    }


def panel(
    title: str,
    targets: list[dict[str, Any]],
    *,
    kind: str = "timeseries",
    unit: str = "",
    w: int = 12,
    h: int = 8,
    description: str = "",
    thresholds: list[tuple[str, float | None]] | None = None,
    draw_thresholds: bool = False,
    minmax: tuple[float | None, float | None] = (None, None),
    options: dict[str, Any] | None = None,
) -> Panel:
    defaults: dict[str, Any] = {"unit": unit} if unit else {}
    if minmax[0] is not None:
        defaults["min"] = minmax[0]
    if minmax[1] is not None:
        defaults["max"] = minmax[1]
    if thresholds:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": c, "value": v} for c, v in thresholds],
        }
    if draw_thresholds:
        defaults["custom"] = {"thresholdsStyle": {"mode": "line+area"}}
    p: Panel = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": targets[0]["datasource"],
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "gridPos": {"w": w, "h": h},
    }
    if options:
        p["options"] = options
    return p


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24}}


PF_STEPS: list[tuple[str, float | None]] = [
    ("red", None),
    ("orange", PF_PENALTY),
    ("green", PF_ALERT),
]

SITE_VAR = {
    "name": "site",
    "label": "Site",
    "type": "query",
    "datasource": SQL,
    "query": "SELECT DISTINCT site FROM pfm_metrics_1m ORDER BY 1",
    "refresh": 2,
    "includeAll": False,
    "multi": False,
}
METER_VAR = {
    "name": "meter",
    "label": "Meter",
    "type": "query",
    "datasource": SQL,
    "query": "SELECT DISTINCT meter FROM pfm_metrics_1m WHERE site = '$site' ORDER BY 1",
    "refresh": 2,
    "includeAll": True,
    "multi": True,
    "allValue": ".*",
}


def dashboard(uid: str, title: str, panels: list[Panel], tags: list[str]) -> dict[str, Any]:
    x = y = 0
    row_h = 0
    for i, p in enumerate(panels, 1):
        p["id"] = i
        w = p["gridPos"].get("w", 12)
        h = p["gridPos"].get("h", 1 if p["type"] == "row" else 8)
        if p["type"] == "row" or x + w > 24:
            x, y = 0, y + row_h
            row_h = 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x += w
        row_h = max(row_h, h)
        if p["type"] == "row":
            x, y, row_h = 0, y + h, 0
    return {
        "uid": uid,
        "title": title,
        "tags": ["pfmon", *tags],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [SITE_VAR, METER_VAR]},
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["pfmon"], "asDropdown": True, "title": "pfmon"}],
        "panels": panels,
    }


M = 'meter=~"$meter"'


def power_factor() -> dict[str, Any]:
    return dashboard(
        "pfm-power-factor",
        "pfmon - Power factor",
        [
            panel(
                "PF per meter (live)",
                [prom(f"pfm_analytics_power_factor{{{M}}}", "{{meter}}")],
                unit="none",
                minmax=(0.5, 1),
                thresholds=PF_STEPS,
                draw_thresholds=True,
                description=f"True PF = P/S. Orange line: utility penalty ({PF_PENALTY}); "
                f"green: internal alert threshold ({PF_ALERT}), the site-file defaults.",
                w=16,
            ),
            panel(
                "PF now",
                [prom(f"pfm_analytics_power_factor{{{M}}}", "{{meter}}", instant=True)],
                kind="stat",
                unit="none",
                thresholds=PF_STEPS,
                w=8,
                options={"colorMode": "background", "reduceOptions": {"calcs": ["lastNotNull"]}},
            ),
            panel(
                "Site PF (sum P / sum S over the selected meters, 1 min)",
                [
                    sql(
                        """SELECT ts AS time,
                           sum(power) / nullif(sum(apparent_power), 0) AS "site PF"
                           FROM pfm_metrics_1m
                           WHERE $__timeFilter(ts) AND site = '$site' AND meter IN ($meter)
                           GROUP BY ts ORDER BY 1"""
                    )
                ],
                unit="none",
                minmax=(0.5, 1),
                thresholds=PF_STEPS,
                draw_thresholds=True,
                description="Select only the incomer meter(s) to avoid counting sub-meters twice.",
            ),
            panel(
                "Demand PF and displacement PF (15 min)",
                [
                    sql(
                        """SELECT ts AS time, meter || ' demand' AS metric, demand_pf AS value
                           FROM pfm_metrics_15m
                           WHERE $__timeFilter(ts) AND site = '$site' AND meter IN ($meter)
                           ORDER BY 1""",
                        "A",
                    ),
                    sql(
                        """SELECT ts AS time, meter || ' DPF L1' AS metric,
                           displacement_pf_l1 AS value
                           FROM pfm_metrics_15m
                           WHERE $__timeFilter(ts) AND site = '$site' AND meter IN ($meter)
                           ORDER BY 1""",
                        "B",
                    ),
                ],
                unit="none",
                thresholds=PF_STEPS,
                draw_thresholds=True,
                description="The billing view: PF over the utility's demand window.",
            ),
            panel(
                "Hours below the penalty threshold (per day)",
                [
                    sql(
                        f"""SELECT date_trunc('day', ts) AS time, meter AS metric,
                           count(*) FILTER (WHERE abs(power_factor) < {PF_PENALTY}) AS value
                           FROM pfm_metrics_1h
                           WHERE $__timeFilter(ts) AND site = '$site' AND meter IN ($meter)
                           GROUP BY 1, 2 ORDER BY 1"""
                    )
                ],
                kind="barchart",
                unit="h",
                w=24,
            ),
        ],
        ["power-factor"],
    )


def reactive() -> dict[str, Any]:
    return dashboard(
        "pfm-reactive",
        "pfmon - Reactive power and capacitor banks",
        [
            panel(
                "Reactive power Q (total and fundamental)",
                [
                    sql(
                        """SELECT ts AS time, meter || ' Q' AS metric, reactive_power AS value
                           FROM pfm_metrics_1m
                           WHERE $__timeFilter(ts) AND site = '$site' AND meter IN ($meter)
                           ORDER BY 1""",
                        "A",
                    ),
                    sql(
                        """SELECT ts AS time, meter || ' Q1' AS metric,
                           fund_reactive_power AS value
                           FROM pfm_metrics_1m
                           WHERE $__timeFilter(ts) AND site = '$site' AND meter IN ($meter)
                           ORDER BY 1""",
                        "B",
                    ),
                ],
                unit="var",
                description="Q > 0 inductive (lagging), Q < 0 capacitive. Q1 = fundamental.",
                w=24,
            ),
            panel(
                "Capacitor steps in",
                [prom("pfm_actuator_steps_in", "{{bank}}")],
                unit="none",
                description="Steps switched in per bank.",
                options={"legend": {"displayMode": "table"}},
            ),
            panel(
                "Step operations (per hour)",
                [prom("sum by (bank, step) (increase(pfm_actuator_step_operations_total[1h]))", "{{bank}} step {{step}}")],
                kind="barchart",
                unit="none",
                description="Contactor wear: every switch-in or -out counts.",
            ),
            panel(
                "Commands by device and origin (rate)",
                [prom("sum by (device, origin) (rate(pfm_actuator_commands_total[5m]))", "{{device}} {{origin}}")],
                unit="ops",
            ),
            panel(
                "Active relay rules",
                [prom("pfm_actuator_rule_active", "{{rule}}")],
                kind="state-timeline",
            ),
            panel(
                "Last commands",
                [
                    sql(
                        """SELECT ts AS time, device, address, value, reason, origin, dry_run
                           FROM pfm_commands
                           WHERE $__timeFilter(ts) AND site = '$site'
                           ORDER BY ts DESC LIMIT 200""",
                        fmt="table",
                    )
                ],
                kind="table",
                w=24,
            ),
        ],
        ["reactive", "capacitor-bank"],
    )


def power_quality() -> dict[str, Any]:
    def per_phase(col: str, label: str, ref: str) -> dict[str, Any]:
        return sql(
            f"""SELECT ts AS time, meter || ' {label}' AS metric, {col} AS value
                FROM pfm_metrics_1m
                WHERE $__timeFilter(ts) AND site = '$site' AND meter IN ($meter)
                ORDER BY 1""",
            ref,
        )

    return dashboard(
        "pfm-power-quality",
        "pfmon - THD, harmonics, unbalance, neutral",
        [
            panel(
                "Voltage THD per phase",
                [
                    per_phase("thd_voltage_l1", "L1", "A"),
                    per_phase("thd_voltage_l2", "L2", "B"),
                    per_phase("thd_voltage_l3", "L3", "C"),
                ],
                unit="percent",
                thresholds=[("green", None), ("orange", 5), ("red", 8)],
                draw_thresholds=True,
                description="THD-F to the 50th harmonic. EN 50160 limit 8 %; IEEE 519 5 % at PCC.",
            ),
            panel(
                "Current THD per phase",
                [
                    per_phase("thd_current_l1", "L1", "A"),
                    per_phase("thd_current_l2", "L2", "B"),
                    per_phase("thd_current_l3", "L3", "C"),
                ],
                unit="percent",
            ),
            panel(
                "Voltage unbalance (negative sequence u2)",
                [
                    per_phase("voltage_unbalance", "u2", "A"),
                    per_phase("nema_unbalance", "NEMA", "B"),
                ],
                unit="percent",
                thresholds=[("green", None), ("red", 2)],
                draw_thresholds=True,
                description="Alarm threshold: thresholds.voltage_unbalance_pct (default 2 %).",
            ),
            panel(
                "Broken-neutral score (live)",
                [prom(f"pfm_analytics_neutral_score{{{M}}}", "{{meter}}")],
                unit="none",
                minmax=(0, 1),
                description="0 = healthy neutral; rising towards 1 = a floating neutral "
                "(voltage shifts with the load).",
            ),
            panel(
                "Neutral current and neutral score (1 min)",
                [
                    per_phase("neutral_current", "I_N", "A"),
                    per_phase("neutral_score", "score", "B"),
                ],
                unit="none",
            ),
            panel(
                "Non-active power N and apparent power S",
                [
                    per_phase("nonactive_power_l1", "N L1", "A"),
                    per_phase("apparent_power", "S", "B"),
                ],
                unit="VA",
                description="IEEE 1459: N includes distortion power; large N with small Q "
                "means harmonics, not displacement.",
            ),
        ],
        ["power-quality", "harmonics"],
    )


def alarms() -> dict[str, Any]:
    return dashboard(
        "pfm-alarms",
        "pfmon - Alarms",
        [
            panel(
                "Active alarms",
                [prom(f"sum by (meter, code) (pfm_analytics_alarms_active{{{M}}}) > 0", "{{meter}} {{code}}", instant=True)],
                kind="table",
                w=12,
            ),
            panel(
                "Alarm count",
                [prom("sum(pfm_analytics_alarms_active)", "active", instant=True)],
                kind="stat",
                thresholds=[("green", None), ("red", 1)],
                w=6,
            ),
            panel(
                "Transitions (1 h)",
                [prom("sum by (state) (increase(pfm_analytics_alarm_transitions_total[1h]))", "{{state}}")],
                kind="bargauge",
                w=6,
            ),
            panel(
                "Alarm timeline",
                [prom(f"pfm_analytics_alarms_active{{{M}}}", "{{meter}} {{code}}")],
                kind="state-timeline",
                w=24,
            ),
            panel(
                "Events",
                [
                    sql(
                        """SELECT ts AS time, meter, code, state, severity, phase, message
                           FROM pfm_events
                           WHERE $__timeFilter(ts) AND site = '$site' AND meter IN ($meter)
                           ORDER BY ts DESC LIMIT 500""",
                        fmt="table",
                    )
                ],
                kind="table",
                w=24,
                h=12,
            ),
        ],
        ["alarms"],
    )


def device_health() -> dict[str, Any]:
    return dashboard(
        "pfm-device-health",
        "pfmon - Device health",
        [
            panel(
                "Meters online",
                [prom(f"pfm_collector_meter_online{{{M}}}", "{{meter}}")],
                kind="state-timeline",
                thresholds=[("red", None), ("green", 1)],
                w=16,
            ),
            panel(
                "Offline meters",
                [prom("count(pfm_collector_meter_online == 0) or vector(0)", "offline", instant=True)],
                kind="stat",
                thresholds=[("green", None), ("red", 1)],
                w=8,
            ),
            panel(
                "Poll errors by kind",
                [prom(f"sum by (meter, kind) (rate(pfm_collector_poll_errors_total{{{M}}}[5m]))", "{{meter}} {{kind}}")],
                unit="ops",
                description="timeout, exception_NN (the Modbus exception code), crc, decode...",
            ),
            panel(
                "Poll success rate",
                [
                    prom(
                        f"sum by (meter) (rate(pfm_collector_polls_total{{{M}}}[5m]))",
                        "{{meter}}",
                    )
                ],
                unit="ops",
            ),
            panel(
                "Poll duration (p50 / p95)",
                [
                    prom("histogram_quantile(0.5, sum by (le) (rate(pfm_collector_poll_seconds_bucket[5m])))", "p50", "A"),
                    prom("histogram_quantile(0.95, sum by (le) (rate(pfm_collector_poll_seconds_bucket[5m])))", "p95", "B"),
                ],
                unit="s",
            ),
            panel(
                "Poll jitter",
                [prom("histogram_quantile(0.95, sum by (le) (rate(pfm_collector_poll_jitter_seconds_bucket[5m])))", "p95")],
                unit="s",
                description="How late polls start against their schedule.",
            ),
            panel(
                "Actuator write errors",
                [prom("sum by (device) (increase(pfm_actuator_write_errors_total[1h]))", "{{device}}")],
                kind="bargauge",
            ),
            panel(
                "Device status",
                [
                    sql(
                        """SELECT ts AS time, kind, device, online, message
                           FROM pfm_device_status
                           WHERE site = '$site' AND $__timeFilter(ts)
                           ORDER BY ts DESC LIMIT 200""",
                        fmt="table",
                    )
                ],
                kind="table",
            ),
        ],
        ["devices", "modbus"],
    )


def pipeline() -> dict[str, Any]:
    return dashboard(
        "pfm-pipeline",
        "pfmon - Pipeline health",
        [
            panel(
                "Broker connection",
                [prom("pfm_bus_connected", "{{service}}")],
                kind="state-timeline",
                thresholds=[("red", None), ("green", 1)],
                w=16,
            ),
            panel(
                "Reconnects (1 h)",
                [prom("sum by (service) (increase(pfm_bus_reconnects_total[1h]))", "{{service}}")],
                kind="bargauge",
                w=8,
            ),
            panel(
                "Messages in / out",
                [
                    prom("sum by (service, kind) (rate(pfm_messages_received_total[5m]))", "in {{service}} {{kind}}", "A"),
                    prom("sum by (service, kind) (rate(pfm_messages_published_total[5m]))", "out {{service}} {{kind}}", "B"),
                ],
                unit="ops",
            ),
            panel(
                "Dead letters and handler errors",
                [
                    prom("sum by (service, kind) (increase(pfm_deadletters_total[15m]))", "dead {{service}} {{kind}}", "A"),
                    prom("sum by (service, kind) (increase(pfm_handler_errors_total[15m]))", "error {{service}} {{kind}}", "B"),
                ],
                thresholds=[("green", None), ("red", 1)],
            ),
            panel(
                "Archiver lag",
                [prom("pfm_archiver_lag_seconds", "lag")],
                unit="s",
                thresholds=[("green", None), ("orange", 30), ("red", 120)],
                draw_thresholds=True,
            ),
            panel(
                "Spool, buffer and spill depth",
                [
                    prom("pfm_collector_spool_records", "collector spool", "A"),
                    prom("pfm_archiver_buffer_records", "archiver buffer", "B"),
                    prom("pfm_archiver_spill_records", "archiver spill", "C"),
                ],
                unit="short",
                description="Records waiting on disk or in memory; should return to 0.",
            ),
            panel(
                "Dropped by a full spool",
                [prom("sum(increase(pfm_collector_spool_dropped_total[1h]))", "dropped", instant=True)],
                kind="stat",
                thresholds=[("green", None), ("red", 1)],
                w=6,
            ),
            panel(
                "Rows archived",
                [prom("sum by (table) (rate(pfm_archiver_rows_total[5m]))", "{{table}}")],
                unit="ops",
                w=9,
            ),
            panel(
                "Database: flush time and errors",
                [
                    prom("histogram_quantile(0.95, sum by (le) (rate(pfm_archiver_flush_seconds_bucket[5m])))", "flush p95", "A"),
                    prom("sum by (kind) (increase(pfm_archiver_db_errors_total[15m]))", "errors {{kind}}", "B"),
                ],
                w=9,
            ),
            panel(
                "Analytics processing time (p95)",
                [prom("histogram_quantile(0.95, sum by (le) (rate(pfm_analytics_process_seconds_bucket[5m])))", "p95")],
                unit="s",
            ),
            panel(
                "Readings analysed",
                [prom("sum by (meter) (rate(pfm_analytics_readings_total[5m]))", "{{meter}}")],
                unit="ops",
            ),
            panel(
                "Metric rows stored per hour",
                [
                    sql(
                        """SELECT date_trunc('hour', ts) AS time, count(*) AS rows
                           FROM pfm_metrics
                           WHERE $__timeFilter(ts) AND site = '$site'
                           GROUP BY 1 ORDER BY 1"""
                    )
                ],
                kind="barchart",
                w=24,
            ),
        ],
        ["pipeline"],
    )


DASHBOARDS = {
    "pfm-power-factor": power_factor,
    "pfm-reactive": reactive,
    "pfm-power-quality": power_quality,
    "pfm-alarms": alarms,
    "pfm-device-health": device_health,
    "pfm-pipeline": pipeline,
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, build in DASHBOARDS.items():
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(build(), indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
