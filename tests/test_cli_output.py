"""pfmon's tables written to a file or a pipe (logs, CI) keep one line per row."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from services.common import PIPE_WIDTH, console


def test_a_pipe_gets_a_wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    out = console()
    assert not out.is_terminal  # pytest captures stdout
    assert out.width == PIPE_WIDTH
    monkeypatch.setenv("COLUMNS", "132")
    assert console(stderr=True).width == 132


def test_a_table_row_is_one_line_in_a_pipe() -> None:
    code = (
        "from rich.table import Table\n"
        "from services.common import console\n"
        "t = Table('meter', 'P kW', 'Q kvar', 'S kVA', 'PF', 'load', 'state', 'note')\n"
        "t.add_row('compressor_hall_2', '123.4', '-45.6', '131.5', '0.938', 'inductive',"
        " 'online', 'magnitude-only meter: no lead/lag')\n"
        "console().print(t)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if "compressor_hall_2" in line]
    assert len(rows) == 1 and "magnitude-only meter: no lead/lag" in rows[0], res.stdout
