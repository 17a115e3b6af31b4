"""Every dashboard panel and alert rule refers to something pfmon really produces.

* Metrics: collected by parsing (ast) every ``Counter/Gauge/Histogram/Summary/Info/Enum``
  constructor called with a literal ``pfm_...`` name under ``services/`` and ``shared/``,
  with the series names each exposes (``_total``, ``_info``, ``_bucket/_sum/_count``) and
  its label names. Every PromQL query of every panel (and of ``alerts.yml``) may only
  name those metrics and group/filter by their labels; ``promtool`` parses every query.
* Tables and columns: the archiver's migrations (``services/archiver/migrations/*.sql``)
  are applied to a scratch schema of the real PostgreSQL and every SQL query of every
  panel is ``EXPLAIN``-ed there (Grafana macros and variables substituted), so a missing
  table or column fails with PostgreSQL's own message, naming the panel.

A metric, label, table or column that pfmon does not produce fails the test, naming the
panel or rule.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
MIGRATIONS = REPO / "services" / "archiver" / "migrations"
DATASOURCES = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "pfmon.yml"
PROMTOOL = shutil.which("promtool")

CONSTRUCTORS = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
#: labels Prometheus adds (targets, histogram buckets) and those the scrape configs set
EXTRA_LABELS = {"job", "instance", "le", "quantile", "component", "gateway_site", "__name__"}
#: PromQL words that look like identifiers but are not metrics
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "and", "or", "unless", "offset", "rate", "irate", "increase", "delta", "idelta",
    "deriv", "abs", "absent", "clamp_min", "clamp_max", "histogram_quantile", "vector",
    "scalar", "time", "label_replace", "label_join", "sort", "sort_desc", "avg_over_time",
    "max_over_time", "min_over_time", "sum_over_time", "count_over_time", "changes",
    "resets", "round", "ceil", "floor", "up", "inf", "nan", "printf", "humanizeDuration",
}  # fmt: skip


# -- what the code produces ---------------------------------------------------------------


@dataclass
class MetricDef:
    name: str
    kind: str
    labels: set[str] | None  # None: not a literal, not checked
    where: str
    series: set[str] = field(default_factory=set)


def _literal_strings(node: ast.AST | None) -> list[str] | None:
    if isinstance(node, ast.List | ast.Tuple):
        out = []
        for elt in node.elts:
            if not (isinstance(elt, ast.Constant) and isinstance(elt.value, str)):
                return None
            out.append(elt.value)
        return out
    return None


def produced_metrics() -> dict[str, MetricDef]:
    """exposed series name -> its definition, from the source code."""
    series: dict[str, MetricDef] = {}
    for root in ("services", "shared"):
        for path in sorted((REPO / root).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                fname = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if fname not in CONSTRUCTORS:
                    continue
                name_node = node.args[0] if node.args else None
                for kw in node.keywords:
                    if kw.arg == "name":
                        name_node = kw.value
                if not (isinstance(name_node, ast.Constant) and isinstance(name_node.value, str)):
                    continue
                name = name_node.value
                if not name.startswith("pfm_"):
                    continue
                label_node = node.args[2] if len(node.args) > 2 else None
                for kw in node.keywords:
                    if kw.arg == "labelnames":
                        label_node = kw.value
                labels: set[str] | None = set()
                if label_node is not None:
                    found = _literal_strings(label_node)
                    labels = set(found) if found is not None else None
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                d = MetricDef(name, str(fname), labels, where)
                base = name.removesuffix("_total") if fname == "Counter" else name
                d.series = {
                    "Counter": {f"{base}_total", f"{base}_created"},
                    "Gauge": {name},
                    "Histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"},
                    "Summary": {name, f"{name}_sum", f"{name}_count"},
                    "Info": {f"{name}_info"},
                    "Enum": {name},
                }[str(fname)]
                for s in d.series:
                    series[s] = d
    return series


# -- what the dashboards ask for ----------------------------------------------------------


@dataclass
class Query:
    where: str  # "<dashboard file> / panel '<title>' (A)"
    lang: str  # promql | sql
    text: str


def dashboard_queries() -> Iterator[Query]:
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        panels = list(dash.get("panels", []))
        for p in list(panels):
            panels.extend(p.get("panels", []))  # collapsed rows
        for p in panels:
            for t in p.get("targets", []):
                ds = t.get("datasource") or p.get("datasource") or {}
                where = f"{path.name} / panel {p.get('title')!r} ({t.get('refId')})"
                if "expr" in t:
                    yield Query(where, "promql", t["expr"])
                elif "rawSql" in t:
                    yield Query(where, "sql", t["rawSql"])
                else:
                    raise AssertionError(f"{where}: a target with neither expr nor rawSql ({ds})")
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            ds = var.get("datasource") or {}
            query = var.get("query")
            if isinstance(query, dict):
                query = query.get("query") or query.get("rawSql")
            where = f"{path.name} / variable ${var['name']}"
            if "postgres" in str(ds.get("type")):
                yield Query(where, "sql", str(query))
            else:
                yield Query(where, "promql", str(query))


def alert_queries() -> Iterator[Query]:
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            yield Query(f"alerts.yml / {group['name']} / {name}", "promql", rule["expr"])


_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"\{([^}]*)\}")
_LABEL_FN = re.compile(r"label_values\(\s*(?:([a-zA-Z_:][\w:]*)\s*,\s*)?(\w+)\s*\)")


def promql_refs(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression refers to."""
    labels: set[str] = set()
    m = _LABEL_FN.search(expr)
    if m:  # a Grafana variable query: label_values(metric, label)
        return ({m.group(1)} if m.group(1) else set()), {m.group(2)}
    for group in _GROUPING.findall(expr):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    for matcher in _MATCHER.findall(expr):
        for part in matcher.split(","):
            key = re.split(r"=~|!~|!=|=", part, maxsplit=1)[0].strip()
            if key:
                labels.add(key)
    bare = _MATCHER.sub(" ", _STRING.sub(" ", _GROUPING.sub(" ", expr)))
    bare = re.sub(r"\[[^\]]*\]", " ", bare)  # range selectors [5m]
    metrics = {tok for tok in _IDENT.findall(bare) if tok not in PROMQL_WORDS and not tok.isdigit()}
    return {t for t in metrics if t.startswith("pfm_")}, labels


@pytest.fixture(scope="module")
def metrics_in_code() -> dict[str, MetricDef]:
    found = produced_metrics()
    assert "pfm_messages_received_total" in found, "the ast scan found no common metrics"
    return found


def check_promql(queries: list[Query], produced: dict[str, MetricDef]) -> list[str]:
    """What is wrong with these PromQL queries: unknown metrics, unknown labels."""
    failures: list[str] = []
    for q in queries:
        names, labels = promql_refs(q.text)
        known_labels = set(EXTRA_LABELS)
        unknown_label_defs = False
        for name in sorted(names):
            d = produced.get(name)
            if d is None:
                bases = {x.name for x in produced.values()}
                hint = f"; a {name} is defined but exposed as" if name in bases else ""
                if hint:
                    exposed = sorted(
                        produced[s].series for s in produced if produced[s].name == name
                    )
                    hint += f" {exposed[0]}"
                failures.append(f"{q.where}: metric {name} is not produced by pfmon{hint}")
                continue
            if d.labels is None:
                unknown_label_defs = True
            else:
                known_labels |= d.labels
        if names and not unknown_label_defs:
            for label in sorted(labels - known_labels):
                failures.append(
                    f"{q.where}: label {label!r} is not a label of {', '.join(sorted(names))}"
                )
    return failures


def test_every_panel_metric_is_produced(metrics_in_code: dict[str, MetricDef]) -> None:
    queries = [q for q in dashboard_queries() if q.lang == "promql"]
    assert len(queries) > 20
    failures = check_promql(queries, metrics_in_code)
    assert not failures, "dashboard panels refer to what pfmon does not produce:\n" + "\n".join(
        failures
    )


def test_every_alert_rule_metric_is_produced(metrics_in_code: dict[str, MetricDef]) -> None:
    failures = check_promql(list(alert_queries()), metrics_in_code)
    assert not failures, "alert rules refer to what pfmon does not produce:\n" + "\n".join(failures)


def test_the_checker_catches_a_wrong_metric_and_label(
    metrics_in_code: dict[str, MetricDef],
) -> None:
    bad = [
        Query("x.json / panel 'typo'", "promql", "rate(pfm_messages_recieved_total[5m])"),
        Query("x.json / panel 'label'", "promql", "sum by (meter) (pfm_bus_connected)"),
        Query("x.json / panel 'ok'", "promql", 'sum by (service) (pfm_bus_connected{service="a"})'),
    ]
    failures = check_promql(bad, metrics_in_code)
    assert any("typo" in f and "pfm_messages_recieved_total" in f for f in failures), failures
    assert any("'label'" in f and "'meter'" in f for f in failures), failures
    assert not any("'ok'" in f for f in failures), failures


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_every_promql_query_parses(tmp_path: Path) -> None:
    queries = [q for q in [*dashboard_queries(), *alert_queries()] if q.lang == "promql"]
    queries = [q for q in queries if "label_values(" not in q.text]
    names = {f"dash:q{i}": q for i, q in enumerate(queries)}
    rules = {
        "groups": [
            {"name": "dash", "rules": [{"record": n, "expr": q.text} for n, q in names.items()]}
        ]
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    res = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    if res.returncode != 0:
        where = "\n".join(f"{n}: {q.where}: {q.text}" for n, q in names.items() if n in res.stderr)
        raise AssertionError(f"promtool rejects a query:\n{res.stderr}\n{where}")


def test_panels_use_provisioned_datasources() -> None:
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uids = {d["uid"]: d["type"] for d in provisioned}
    problems = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        assert dash["uid"] and dash["title"], path
        for p in dash["panels"]:
            for t in p.get("targets", []):
                ds = t.get("datasource") or p.get("datasource")
                if ds is None or uids.get(ds.get("uid")) != ds.get("type"):
                    problems.append(f"{path.name} / panel {p['title']!r}: datasource {ds}")
    assert not problems, "\n".join(problems)
    assert len(DASHBOARDS) >= 6
    uids_seen = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(set(uids_seen)) == len(uids_seen), "two dashboards share a uid"


def test_panel_layout() -> None:
    """Unique panel ids, panels inside the 24-column grid, no two panels overlapping."""
    for path in DASHBOARDS:
        panels = json.loads(path.read_text())["panels"]
        ids = [p["id"] for p in panels]
        assert len(set(ids)) == len(ids), f"{path.name}: duplicate panel ids"
        cells: dict[tuple[int, int], str] = {}
        for p in panels:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, (path.name, p["title"])
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    other = cells.setdefault((x, y), p["title"])
                    assert other == p["title"], f"{path.name}: {p['title']!r} overlaps {other!r}"


def test_issue_topics_have_a_dashboard() -> None:
    """PF with thresholds, reactive/capacitor steps, THD, unbalance/neutral, alarms,
    device health, pipeline health: each is drawn somewhere."""
    everything = "\n".join(q.text for q in dashboard_queries())
    for needle in (
        "pfm_analytics_power_factor",
        "reactive_power",
        "pfm_actuator_steps_in",
        "thd_voltage_l1",
        "thd_current_l1",
        "voltage_unbalance",
        "neutral_score",
        "pfm_analytics_alarms_active",
        "pfm_events",
        "pfm_collector_poll_errors_total",
        "pfm_collector_meter_online",
        "pfm_archiver_lag_seconds",
        "pfm_collector_spool_records",
        "pfm_archiver_buffer_records",
        "pfm_deadletters_total",
    ):
        assert needle in everything, f"no panel draws {needle}"
    pf = json.loads((REPO / "deploy/grafana/dashboards/pfm-power-factor.json").read_text())
    steps = pf["panels"][0]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps][1:] == [0.90, 0.97], "PF thresholds not drawn"


# -- SQL: tables and columns -----------------------------------------------------------------


async def apply_archiver_schema(conn: asyncpg.Connection) -> None:
    """Build the archiver's schema in the current schema with its own ``migrate()`` (plain
    PostgreSQL here: the same table and column names as on TimescaleDB)."""
    from services.archiver.migrate import migrate
    from shared.site.archiver import ArchiverConfig

    try:
        await migrate(conn, ArchiverConfig())
    except asyncpg.PostgresError as exc:
        raise AssertionError(f"services.archiver.migrate.migrate() failed: {exc}") from exc


def grafana_to_sql(query: str) -> str:
    """Substitute the Grafana macros and variables the dashboards use."""
    out = re.sub(
        r"\$__timeFilter\(([^)]+)\)",
        r"\1 BETWEEN '2024-01-01T00:00:00Z'::timestamptz AND '2024-01-02T00:00:00Z'::timestamptz",
        query,
    )
    out = out.replace("$__timeFrom()", "'2024-01-01T00:00:00Z'::timestamptz")
    out = out.replace("$__timeTo()", "'2024-01-02T00:00:00Z'::timestamptz")
    out = out.replace("$__interval", "'1 minute'")
    out = out.replace("'$site'", "'site1'").replace("$meter", "'m1','m2'")
    leftover = re.findall(r"\$\w+", out)
    if leftover:
        raise AssertionError(f"unknown Grafana macro/variable {leftover} in: {query}")
    return out


async def test_every_panel_table_and_column_exists(db_dsn: str, site_name: str) -> None:
    queries = [q for q in dashboard_queries() if q.lang == "sql"]
    assert len(queries) > 10
    schema = f"dash_{site_name}"
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}", public')
        await apply_archiver_schema(conn)
        failures = []
        for q in queries:
            try:
                await conn.execute(f"EXPLAIN {grafana_to_sql(q.text)}")
            except asyncpg.PostgresError as exc:
                failures.append(f"{q.where}: {type(exc).__name__}: {exc}\n    {q.text}")
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    assert not failures, "dashboard SQL does not match the archiver's schema:\n" + "\n".join(
        failures
    )


async def test_the_sql_check_catches_a_missing_column(db_dsn: str, site_name: str) -> None:
    schema = f"dashx_{site_name}"
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}", public')
        await apply_archiver_schema(conn)
        with pytest.raises(asyncpg.UndefinedColumnError):
            await conn.execute(
                "EXPLAIN " + grafana_to_sql("SELECT power_factr FROM pfm_metrics_1m")
            )
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.execute("EXPLAIN SELECT 1 FROM pfm_metrics_5m")
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
