"""Every expression either parses or is refused with a column; never another exception.

A seeded generator mixes the language's own pieces with the characters that used
to crash or slip through (look-alike letters, full-width and Arabic digits,
superscripts, control characters, emoji), so the run is the same every time.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from services.actuator.expr import CLOCK_TOKENS, TOKENS, ExprError, parse
from services.actuator.rules import check_file
from services.cli import app

pytestmark = pytest.mark.timeout(120)

_NAMES = [*TOKENS, *CLOCK_TOKENS]
_PIECES = [
    *_NAMES,
    *("253", "0.95", "1e3", ".5", "7.", "1e999", "00", "3e", "1e+"),
    *("and", "or", "not", "(", ")", "&&", "||", "!", "<", "<=", ">", ">=", "==", "!="),
    *("+", "-", "*", "/", "=", "&", "|", "^", "%", "~", ".", ",", "_x", "L1", "LII", "$"),
    *(" ", "\t", "\n", "\r", "\x00", "\x7f", "'", '"', "\\"),
    # non-ASCII: look-alikes, other digits, spaces, marks, emoji
    *("ℒ", "Ｌ", "Ⅰ", "ı", "é", "e\u0301", "２５３", "٣", "१", "²", "½", "\u00a0", "\u200b"),
    *("\u2212", "≤", "≥", "∧", "Ω", "µ", "🙂", "\U0001d40b", "\ufeff", "\ud7ff"),
]


def _number(rng: random.Random, depth: int) -> str:
    roll = rng.random()
    if depth > 3 or roll < 0.4:
        return rng.choice([*_NAMES, "253", "0.9", "1e3", ".5", "7", "23"])
    if roll < 0.8:
        op = rng.choice("+-*/")
        return f"{_number(rng, depth + 1)} {op} {_number(rng, depth + 1)}"
    return f"-({_number(rng, depth + 1)})"


def _condition(rng: random.Random, depth: int = 0) -> str:
    roll = rng.random()
    if depth > 3 or roll < 0.5:
        op = rng.choice(("<", "<=", ">", ">=", "==", "!="))
        return f"{_number(rng, depth)} {op} {_number(rng, depth)}"
    if roll < 0.85:
        op = rng.choice(("&&", "||", "and", "or"))
        return f"({_condition(rng, depth + 1)}) {op} ({_condition(rng, depth + 1)})"
    return f"!({_condition(rng, depth + 1)})"


def _expressions(count: int, seed: int = 20261203) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.2:  # grammatical
            out.append(_condition(rng))
            continue
        if roll < 0.5:  # a valid rule with one piece spliced in somewhere
            base = _condition(rng)
            at = rng.randrange(len(base) + 1)
            out.append(base[:at] + rng.choice(_PIECES) + base[at:])
            continue
        parts = [rng.choice(_PIECES) for _ in range(rng.randint(0, 14))]
        out.append("".join(p + rng.choice(("", " ")) for p in parts))
    # deep and long ones: chains, nesting, and every bound at and past its limit
    out += [
        "L1U+" * 1000 + "1 > 2",
        "-" * 3000 + "1 > 2",
        "!" * 200 + "(L1U > 2)",
        "(" * 60 + "L1U > 2" + ")" * 60,
        "-1 + " * 60 + "L1U > 0",
        "(L1U > 1) && " * 300 + "(L1U > 1)",
        "1" * 4000 + " > L1U",
        "L1U > 1" + " " * 5000,
    ]
    return out


EXPRESSIONS = _expressions(2400)


def test_every_expression_parses_or_names_a_column() -> None:
    parsed = refused = 0
    for source in EXPRESSIONS:
        try:
            expr = parse(source)
        except ExprError as exc:
            refused += 1
            assert 1 <= exc.column <= max(len(exc.source), 0) + 1, (source, exc)
            assert f"column {exc.column}" in exc.render()
        else:
            parsed += 1
            assert expr.evaluate(dict.fromkeys(_NAMES, 1.0)) in (True, False)
    # the generator is worth its name: both outcomes occur often
    assert parsed > 100 and refused > 1000, (parsed, refused)


def test_non_ascii_letter_is_refused_with_its_name_and_column() -> None:
    with pytest.raises(ExprError) as info:
        parse("ℒ1U > 253")
    assert info.value.column == 1
    assert "'ℒ' (SCRIPT CAPITAL L) is not allowed" in str(info.value)


def test_full_width_digits_are_refused_not_read_as_253() -> None:
    with pytest.raises(ExprError) as info:
        parse("L1U > ２５３")
    assert info.value.column == 7
    assert "FULLWIDTH DIGIT TWO" in info.value.message
    for source in ("L1U > ٣", "L1U > 2²", "L1U\u00a0> 253", "L1U > 25\u200b3"):
        with pytest.raises(ExprError):
            parse(source)


def test_long_chains_are_refused_with_a_column_not_a_recursion_error() -> None:
    with pytest.raises(ExprError) as info:
        parse("L1U+" * 1000 + "1 > 2")
    assert "split the rule" in info.value.message and info.value.column > 1
    # signs that follow one another in a sum are not nested: 60 of them are fine
    assert parse("-1 + " * 60 + "L1U > 0").evaluate(dict.fromkeys(TOKENS, 100.0))


def _site(when: Any, output: str = "pm:pin:0") -> dict[str, Any]:
    return {
        "site": "plant",
        "buses": [{"name": "b1", "host": "127.0.0.1", "port": 5020}],
        "meters": [{"name": "pm", "bus": "b1", "unit": 3, "profile": "pmtr001"}],
        "devices": [
            {"name": "pm", "bus": "b1", "unit": 3, "kind": "pmtr001"},
            {"name": "io", "bus": "b1", "unit": 10, "coils": 8},
        ],
        "relay_actions": [
            {"name": "a", "meter": "pm", "when": when, "outputs": [output]},
        ],
    }


def test_rules_check_exits_0_or_2_for_every_expression(tmp_path: Path) -> None:
    """The whole check (parse, PMTR_001 upload encoding) on every rule, via the CLI."""
    runner = CliRunner()
    path = tmp_path / "site.yaml"
    codes = {0: 0, 2: 0}
    for i, source in enumerate(EXPRESSIONS[::8]):
        if "\x00" in source or "\ud7ff" in source or "\ufeff" in source:
            continue  # not representable in a YAML file: YAML itself refuses those
        # half on a PMTR_001 pin (the upload encoder sees the rule too), half on a coil
        site = _site(source, "pm:pin:0" if i % 2 else "io:coil:0")
        path.write_text(yaml.safe_dump(site, allow_unicode=True), encoding="utf-8")
        res = runner.invoke(app, ["rules", "check", str(path)])
        assert res.exit_code in codes, (source, res.output, res.exception)
        codes[res.exit_code] += 1
        assert res.exception is None or isinstance(res.exception, SystemExit), source
        if res.exit_code == 2:
            assert "relay_actions[0]" in res.output or "site.yaml" in res.output, res.output
        # the same rules through check_file directly: a list, never a raise
        assert isinstance(check_file(path), list)
    assert codes[0] > 10 and codes[2] > 50, codes


def test_rules_check_process_exits_2_on_a_script_letter(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(_site("ℒ1U > 253"), allow_unicode=True), encoding="utf-8")
    res = subprocess.run(
        [sys.executable, "-m", "services.cli", "rules", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    assert "column 1: 'ℒ' (SCRIPT CAPITAL L) is not allowed" in res.stderr
    assert "Traceback" not in res.stderr


def test_actuator_refuses_a_script_letter_with_exit_2_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(_site("ℒ1U > 253"), allow_unicode=True), encoding="utf-8")
    res = CliRunner().invoke(app, ["actuator", "--site-file", str(path), "--duration", "5"])
    assert res.exit_code == 2, (res.output, res.exception)
    assert "'ℒ' (SCRIPT CAPITAL L) is not allowed" in res.output
