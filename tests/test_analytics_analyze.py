"""``pfmon analyze FILE``: JSON keys, values against analytic answers, and errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from services.cli import app

FS = 12800.0
SQ2 = math.sqrt(2.0)
A = np.exp(2j * np.pi / 3)
runner = CliRunner()


def write(path: Path, cols: dict[str, np.ndarray]) -> Path:
    names = list(cols)
    rows = np.stack([cols[n] for n in names], axis=1)
    lines = [",".join(names)] + [",".join(f"{x:.9g}" for x in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, ["analyze", *args])
    return res.exit_code, res.output


def test_single_phase_json_at_60_hz_with_time_column(tmp_path: Path) -> None:
    f, n = 59.9, 2560  # off-nominal 60 Hz, samples timed by a 't' column
    t = np.arange(n) / FS
    phi = math.acos(0.7)
    v = SQ2 * 120 * np.sin(2 * np.pi * f * t) + SQ2 * 4.8 * np.sin(2 * np.pi * 3 * f * t)
    i = SQ2 * 15 * np.sin(2 * np.pi * f * t + phi)  # leading: capacitive
    path = write(tmp_path / "cap.csv", {"t": t, "v": v, "i": i})
    code, out = run(str(path), "--json", "--f-nominal", "60", "--v-nominal", "120")
    assert code == 0, out
    data = orjson.loads(out)
    assert set(data) == {"frequency_hz", "phases", "total", "events"}
    ph = data["phases"][0]
    keys = {"name", "vrms_v", "irms_a", "p_w", "s_va", "q1_var", "n_var", "pf", "dpf"}
    keys |= {"thd_v_pct", "thd_i_pct", "quadrant", "load", "harmonics_v", "harmonics_i"}
    assert set(ph) == keys
    assert ph["name"] == "L1" and ph["load"] == "capacitive" and ph["quadrant"] == 4
    assert data["frequency_hz"] == pytest.approx(f, rel=1e-4)
    vrms = math.hypot(120, 4.8)
    assert ph["vrms_v"] == pytest.approx(vrms, rel=1e-3)
    assert ph["p_w"] == pytest.approx(120 * 15 * 0.7, rel=1e-3)
    assert ph["pf"] == pytest.approx(120 * 15 * 0.7 / (vrms * 15), rel=1e-3)
    assert ph["q1_var"] == pytest.approx(-120 * 15 * math.sin(phi), rel=1e-3)
    assert ph["thd_v_pct"] == pytest.approx(4.0, rel=1e-2)
    assert len(ph["harmonics_v"]) == 50 and ph["harmonics_v"][2] == pytest.approx(4.8, rel=1e-2)
    assert set(data["total"]) == {"p_w", "q1_var", "s_va", "pf"}
    codes = [e["code"] for e in data["events"]]
    assert codes == ["low_pf", "penalty_pf"]
    low = data["events"][0]
    assert low["evidence"]["limit"] == 0.97 and low["evidence"]["pf"] == pytest.approx(
        0.7, abs=0.01
    )
    # the site's own limits, not fixed numbers: a site that alerts below 0.65 sees no alarm
    site = tmp_path / "site.yaml"
    site.write_text(
        "site: s1\nthresholds: {pf_alert: 0.65, pf_penalty: 0.6, nominal_voltage_v: 120, "
        "nominal_frequency_hz: 60}\n"
    )
    code, out = run(str(path), "--fs", str(FS), "--json", "--site-file", str(site))
    assert code == 0, out
    assert [e["code"] for e in orjson.loads(out)["events"]] == []


def test_three_phase_broken_neutral_and_table(tmp_path: Path) -> None:
    e = [230.0, 230.0 * A**2, 230.0 * A]
    r = [5.0, 20.0, 40.0]
    vn = sum(ee / rr for ee, rr in zip(e, r, strict=True)) / sum(1 / x for x in r)
    n = 2560
    w = 2 * np.pi * 50 * np.arange(n) / FS
    cols: dict[str, np.ndarray] = {}
    for k in range(3):
        vp = e[k] - vn
        cols[f"v{k + 1}"] = SQ2 * abs(vp) * np.cos(w + np.angle(vp))
    for k in range(3):
        ip = (e[k] - vn) / r[k]
        cols[f"i{k + 1}"] = SQ2 * abs(ip) * np.cos(w + np.angle(ip))
    cols["in"] = np.zeros(n)
    path = write(tmp_path / "bn.csv", cols)
    code, out = run(str(path), "--fs", str(FS), "--json")
    assert code == 0, out
    data = orjson.loads(out)
    assert data["neutral"]["displacement_v"] == pytest.approx(abs(vn), rel=1e-3)
    assert data["neutral"]["score"] == 1.0
    assert data["unbalance"]["u0_pct"] == pytest.approx(100 * abs(vn) / 230, rel=1e-3)
    assert data["unbalance"]["u2_pct"] < 0.01
    assert set(data["total"]) == {"p_w", "q1_var", "s_va", "pf", "se_va", "pf_e"}
    p = sum(abs(e[k] - vn) ** 2 / r[k] for k in range(3))
    assert data["total"]["p_w"] == pytest.approx(p, rel=1e-3)
    (bn,) = [e for e in data["events"] if e["code"] == "broken_neutral"]
    assert bn["severity"] == "critical" and bn["evidence"]["score"] == 1.0
    code, table = run(str(path), "--fs", str(FS))
    assert code == 0 and "neutral: score 1.00" in table and "broken_neutral" in table


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("v,x\n1,2\n", ["--fs", "1000"], "line 1: missing column(s) i"),
        ("v,i\n1,2\n3,abc\n", ["--fs", "1000"], "line 3, column 2 (i): 'abc' is not a number"),
        ("v,i\n1,2\n3\n", ["--fs", "1000"], "line 3: expected 2 fields, got 1"),
        ("v,i\n1,2\n3,4\n", [], "no sample rate"),
        ("v,i\n1,2\n3,4\n", ["--fs", "12800"], "fewer than one cycle"),
        ("t,v,i\n0,1,2\n0.1,1,2\n0.1,1,2\n", [], "line 4, column 1 (t): time does not increase"),
        ("", ["--fs", "1000"], "line 1: empty file"),
    ],
)
def test_bad_captures_name_line_and_column(
    tmp_path: Path, content: str, args: list[str], message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    code, out = run(str(path), *args)
    assert code == 2
    assert message in out.replace("\n", " ")
    assert str(path) in out.replace("\n", "")


def test_the_table_is_rich_with_a_row_per_phase_matching_the_json(tmp_path: Path) -> None:
    """Written to a pipe (no COLUMNS): one table row per phase, not wrapped, its cells
    the JSON's values; the summary lines below it."""
    n = 2560
    w = 2 * np.pi * 50 * np.arange(n) / FS
    cols: dict[str, np.ndarray] = {}
    for k, amps in enumerate((10.0, 20.0, 30.0)):
        shift = -2 * np.pi * k / 3
        cols[f"v{k + 1}"] = SQ2 * 230.0 * np.cos(w + shift)
        cols[f"i{k + 1}"] = SQ2 * amps * np.cos(w + shift - np.arccos(0.8))
    path = write(tmp_path / "lag.csv", cols)
    _, out = run(str(path), "--fs", str(FS), "--json")
    data = orjson.loads(out)
    res = runner.invoke(app, ["analyze", str(path), "--fs", str(FS)], env={"COLUMNS": None})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    header = next(x for x in lines if "Vrms V" in x)
    names = [c.strip() for c in header.strip("┃ ").split("┃")]
    assert names[:3] == ["phase", "Vrms V", "Irms A"] and names[-1] == "load"
    for ph in data["phases"]:
        (row,) = [x for x in lines if x.startswith("│") and f" {ph['name']} " in x]
        cells = dict(zip(names, (c.strip() for c in row.strip("│ ").split("│")), strict=True))
        assert cells["Vrms V"] == f"{ph['vrms_v']:.2f}"
        assert cells["Irms A"] == f"{ph['irms_a']:.3f}"
        assert cells["PF"] == f"{ph['pf']:.4f}" and float(cells["PF"]) == pytest.approx(0.8)
        assert cells["load"] == ph["load"] == "inductive"
    assert f"total: P {data['total']['p_w']:.1f} W" in res.output
    assert "events: " in res.output
