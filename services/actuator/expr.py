"""The relay-action expression language: our own tokenizer and parser, never ``eval``.

Grammar (loosest first)::

    expr       := or
    or         := and (("||" | "or") and)*
    and        := not (("&&" | "and") not)*
    not        := ("!" | "not") not | comparison
    comparison := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)?
    sum        := product (("+" | "-") product)*
    product    := unary (("*" | "/") unary)*
    unary      := ("-" | "+") unary | NUMBER | TOKEN | "(" expr ")"

Tokens name measurements in SI units (``L1U`` volts, ``L2I`` amperes, ``L1e`` kWh ...),
or the time of the message in the site's time zone (``hour``, ``minute``, ``weekday``,
``month``: :data:`CLOCK_TOKENS`).
The parser also checks types: ``&&``/``||``/``!`` take conditions, arithmetic and
comparisons take numbers, and the whole expression must be a condition. A parsed
expression is compiled once into nested closures; evaluation reads a mapping
``token -> float`` and does nothing else (no names, attributes, calls or imports
exist in the language, so no expression can run code).

Every error carries the 1-based column and, for an unknown name, the nearest token.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from shared.measurements import Measurement

__all__ = [
    "CLOCK_TOKENS",
    "TOKENS",
    "BinOp",
    "Compare",
    "ExprError",
    "Expression",
    "Logic",
    "Neg",
    "Node",
    "Not",
    "Num",
    "Var",
    "parse",
    "suggest",
]


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """What a token reads: a measurement, the factor from message units, averaged or not."""

    measurement: Measurement
    unit: str
    factor: float = 1.0  # token value = message value * factor
    averaged: bool = True


def _token_table() -> dict[str, TokenSpec]:
    table: dict[str, TokenSpec] = {}
    per_phase = {
        "U": ("voltage", "V"),
        "I": ("current", "A"),
        "P": ("power", "W"),
        "Q": ("reactive_power", "var"),
        "S": ("apparent_power", "VA"),
        "pf": ("power_factor", ""),
        "f": ("frequency", "Hz"),
        "thdu": ("thd_voltage", "%"),
        "thdi": ("thd_current", "%"),
    }
    for ph in (1, 2, 3):
        for suffix, (stem, unit) in per_phase.items():
            table[f"L{ph}{suffix}"] = TokenSpec(Measurement.per_phase(stem, ph), unit)
        # energy: messages carry Wh, the token is kWh, and it is never averaged
        table[f"L{ph}e"] = TokenSpec(
            Measurement.per_phase("import_energy", ph), "kWh", 0.001, averaged=False
        )
    table.update(
        {
            "P": TokenSpec(Measurement.POWER, "W"),
            "Q": TokenSpec(Measurement.REACTIVE_POWER, "var"),
            "S": TokenSpec(Measurement.APPARENT_POWER, "VA"),
            "pf": TokenSpec(Measurement.POWER_FACTOR, ""),
            "u2": TokenSpec(Measurement.VOLTAGE_UNBALANCE, "%"),
            "neutral": TokenSpec(Measurement.NEUTRAL_SCORE, ""),
        }
    )
    return table


#: every measurement token of the language and what it reads
TOKENS: dict[str, TokenSpec] = _token_table()


@dataclass(frozen=True, slots=True)
class ClockSpec:
    """A clock token: a part of the message's acquisition time in the site's time zone."""

    low: int
    high: int
    meaning: str


#: the clock tokens: read from the message's ``ts`` converted to the site's ``timezone``
CLOCK_TOKENS: dict[str, ClockSpec] = {
    "hour": ClockSpec(0, 23, "hour of the day, 0-23"),
    "minute": ClockSpec(0, 59, "minute of the hour, 0-59"),
    "weekday": ClockSpec(1, 7, "day of the week, 1 = Monday ... 7 = Sunday (ISO 8601)"),
    "month": ClockSpec(1, 12, "month, 1 = January ... 12 = December"),
}
_KEYWORDS = {"and": "&&", "or": "||", "not": "!"}


class ExprError(ValueError):
    """A bad expression: ``message`` says what, ``column`` (1-based) says where."""

    def __init__(self, message: str, column: int, source: str) -> None:
        super().__init__(f"column {column}: {message}")
        self.message = message
        self.column = column
        self.source = source

    def render(self) -> str:
        """The error, the expression and a caret under the column."""
        caret = " " * (self.column - 1) + "^"
        return f"column {self.column}: {self.message}\n    {self.source}\n    {caret}"


# -- tokenizer -------------------------------------------------------------------------

Kind = Literal["num", "name", "op", "(", ")", "end"]


@dataclass(frozen=True, slots=True)
class Tok:
    kind: Kind
    text: str
    column: int  # 1-based
    value: float = 0.0


_NUMBER = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_DIGITS = frozenset("0123456789")
_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_OPS2 = ("&&", "||", "<=", ">=", "==", "!=")
_OPS1 = "+-*/<>!"
_HINTS = {
    "=": "'=' is not an operator: use '==' to compare",
    "&": "'&' is not an operator: use '&&' (or 'and')",
    "|": "'|' is not an operator: use '||' (or 'or')",
    "^": "'^' is not an operator here: only + - * / exist",
    "%": "'%' is not an operator here: only + - * / exist",
    "~": "'~' is not an operator here: use '!' (or 'not')",
}


def _char_name(c: str) -> str:
    return unicodedata.name(c, f"U+{ord(c):04X}")


def _refuse_non_ascii(source: str) -> None:
    """Only ASCII is allowed: a look-alike letter or a full-width digit is refused, not read."""
    for i, c in enumerate(source):
        if not c.isascii():
            raise ExprError(
                f"{c!r} ({_char_name(c)}) is not allowed: expressions are plain ASCII "
                "(tokens like L1U, digits 0-9, operators)",
                i + 1,
                source,
            )


def tokenize(source: str) -> list[Tok]:
    _refuse_non_ascii(source)
    out: list[Tok] = []
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c in " \t":
            i += 1
            continue
        col = i + 1
        two = source[i : i + 2]
        number = _NUMBER.match(source, i) if c in _DIGITS or c == "." else None
        if number is not None:
            text = number.group(0)
            end = number.end()
            if end < n and source[end] in _LETTERS:
                tail = _NAME.match(source, end)
                word = text + (tail.group(0) if tail else "")
                raise ExprError(
                    f"{word!r} is not a number or a token{_did_you_mean(word)}", col, source
                )
            out.append(Tok("num", text, col, float(text)))
            i = end
        elif (name := _NAME.match(source, i)) is not None:
            word = name.group(0)
            if word in _KEYWORDS:
                out.append(Tok("op", _KEYWORDS[word], col))
            elif word in TOKENS or word in CLOCK_TOKENS:
                out.append(Tok("name", word, col))
            else:
                raise ExprError(f"unknown token {word!r}{_did_you_mean(word)}", col, source)
            i = name.end()
        elif two in _OPS2:
            out.append(Tok("op", two, col))
            i += 2
        elif c in _OPS1:
            out.append(Tok("op", c, col))
            i += 1
        elif c == "(":
            out.append(Tok("(", c, col))
            i += 1
        elif c == ")":
            out.append(Tok(")", c, col))
            i += 1
        elif c in _HINTS:
            raise ExprError(_HINTS[c], col, source)
        elif c == ".":
            raise ExprError("'.' must be part of a number (e.g. 0.95)", col, source)
        elif c.isprintable():
            raise ExprError(f"unexpected character {c!r}", col, source)
        else:
            raise ExprError(f"unexpected control character {c!r}", col, source)
    out.append(Tok("end", "", n + 1))
    return out


# -- nearest-token suggestions -----------------------------------------------------------

_LOOKALIKE = {frozenset(p) for p in (("1", "I"), ("1", "l"), ("I", "l"), ("0", "O"), ("0", "o"))}


def _cost(a: str, b: str) -> float:
    if a == b:
        return 0.0
    if a.lower() == b.lower():
        return 0.25
    if frozenset((a, b)) in _LOOKALIKE:
        return 0.5
    return 1.0


def _distance(a: str, b: str) -> float:
    """Edit distance where case and look-alike characters (I/1/l, O/0) cost less."""
    prev = [float(j) for j in range(len(b) + 1)]
    for i, ca in enumerate(a, 1):
        cur = [float(i)]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + _cost(ca, cb)))
        prev = cur
    return prev[-1]


def suggest(word: str) -> str | None:
    """The nearest token to ``word`` (None when nothing is close)."""
    candidates = list(TOKENS) + list(CLOCK_TOKENS) + list(_KEYWORDS)
    best = min(candidates, key=lambda t: (_distance(word, t), t))
    limit = max(1.0, len(word) / 2)
    return best if _distance(word, best) <= limit else None


def _did_you_mean(word: str) -> str:
    best = suggest(word)
    return f" (did you mean {best!r}?)" if best else ""


# -- AST ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Num:
    value: float
    column: int


@dataclass(frozen=True, slots=True)
class Var:
    name: str
    column: int


@dataclass(frozen=True, slots=True)
class Neg:
    operand: Node
    column: int


@dataclass(frozen=True, slots=True)
class BinOp:
    op: str  # + - * /
    left: Node
    right: Node
    column: int


@dataclass(frozen=True, slots=True)
class Compare:
    op: str  # < <= > >= == !=
    left: Node
    right: Node
    column: int


@dataclass(frozen=True, slots=True)
class Logic:
    op: str  # && ||
    left: Node
    right: Node
    column: int


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node
    column: int


Node = Num | Var | Neg | BinOp | Compare | Logic | Not


def _is_bool(node: Node) -> bool:
    return isinstance(node, Compare | Logic | Not)


def _children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, Neg | Not):
        return (node.operand,)
    if isinstance(node, BinOp | Compare | Logic):
        return (node.left, node.right)
    return ()


def _too_deep(root: Node, limit: int) -> Node | None:
    """The first node deeper than ``limit`` (walked without recursion), or None."""
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return node
        stack.extend((child, depth + 1) for child in _children(node))
    return None


# -- parser ----------------------------------------------------------------------------

_MAX_DEPTH = 48
#: the deepest parsed tree (operators chained or nested); evaluation and the PMTR_001
#: upload walk the tree recursively, so its depth is bounded at parse time
_MAX_TREE_DEPTH = 200
_COMPARE = ("<", "<=", ">", ">=", "==", "!=")


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.toks = tokenize(source)
        self.pos = 0
        self.open_parens: list[int] = []
        self.depth = 0

    def peek(self) -> Tok:
        return self.toks[self.pos]

    def take(self) -> Tok:
        tok = self.toks[self.pos]
        self.pos += 1
        return tok

    def error(self, message: str, column: int) -> ExprError:
        return ExprError(message, column, self.source)

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise self.error("the expression is empty", 1)
        node = self.parse_or()
        tok = self.peek()
        if tok.kind == ")":
            raise self.error("')' has no matching '('", tok.column)
        if tok.kind != "end":
            raise self.error(f"expected an operator before {tok.text!r}", tok.column)
        if not _is_bool(node):
            raise self.error(
                "the expression is a number, not a condition: compare it (e.g. L1U > 253)", 1
            )
        deep = _too_deep(node, _MAX_TREE_DEPTH)
        if deep is not None:
            raise self.error(
                f"more than {_MAX_TREE_DEPTH} operators chained or nested: split the rule",
                deep.column,
            )
        return node

    def _logic_operand(self, node: Node, op: Tok, side: str) -> Node:
        if not _is_bool(node):
            raise self.error(
                f"the {side} side of {op.text!r} is a number, not a condition "
                "(compare it, e.g. L1U > 253)",
                getattr(node, "column", op.column) if side == "left" else op.column,
            )
        return node

    def parse_or(self) -> Node:
        node = self.parse_and()
        while self.peek().kind == "op" and self.peek().text == "||":
            op = self.take()
            right = self.parse_and()
            self._logic_operand(node, op, "left")
            self._logic_operand(right, op, "right")
            node = Logic("||", node, right, op.column)
        return node

    def parse_and(self) -> Node:
        node = self.parse_not()
        while self.peek().kind == "op" and self.peek().text == "&&":
            op = self.take()
            right = self.parse_not()
            self._logic_operand(node, op, "left")
            self._logic_operand(right, op, "right")
            node = Logic("&&", node, right, op.column)
        return node

    def parse_not(self) -> Node:
        tok = self.peek()
        if tok.kind == "op" and tok.text == "!":
            self.take()
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise self.error(f"more than {_MAX_DEPTH} nested '!'", tok.column)
            operand = self.parse_not()
            self.depth -= 1
            if not _is_bool(operand):
                raise self.error("'!' (not) needs a condition, e.g. !(L1U > 253)", tok.column)
            return Not(operand, tok.column)
        return self.parse_comparison()

    def parse_comparison(self) -> Node:
        left = self.parse_sum()
        tok = self.peek()
        if tok.kind == "op" and tok.text in _COMPARE:
            self.take()
            right = self.parse_sum()
            for side, node in (("left", left), ("right", right)):
                if _is_bool(node):
                    raise self.error(
                        f"the {side} side of {tok.text!r} is a condition; compare numbers",
                        tok.column,
                    )
            nxt = self.peek()
            if nxt.kind == "op" and nxt.text in _COMPARE:
                raise self.error("comparisons do not chain: write (a < b) && (b < c)", nxt.column)
            self._check_clock(left, right)
            self._check_clock(right, left)
            return Compare(tok.text, left, right, tok.column)
        return left

    def _check_clock(self, token: Node, other: Node) -> None:
        """A clock token compared with a number: the number must be one of its values
        (``weekday == 0`` or ``hour >= 22.5`` would silently never mean what was meant)."""
        if not isinstance(token, Var) or token.name not in CLOCK_TOKENS:
            return
        sign, num = 1.0, other
        if isinstance(num, Neg):
            sign, num = -1.0, num.operand
        if not isinstance(num, Num):
            return
        spec, value = CLOCK_TOKENS[token.name], sign * num.value
        if value != int(value):
            raise self.error(
                f"{token.name} is a whole number ({spec.meaning}): compare it with one, "
                "e.g. hour * 60 + minute >= 22 * 60 + 30 for 22:30",
                num.column,
            )
        if not spec.low <= value <= spec.high:
            raise self.error(
                f"{token.name} is never {value:g}: it is the {spec.meaning}", num.column
            )

    def parse_sum(self) -> Node:
        node = self.parse_product()
        while self.peek().kind == "op" and self.peek().text in "+-":
            op = self.take()
            right = self.parse_product()
            node = BinOp(op.text, self._number(node, op), self._number(right, op), op.column)
        return node

    def parse_product(self) -> Node:
        node = self.parse_unary()
        while self.peek().kind == "op" and self.peek().text in "*/":
            op = self.take()
            right = self.parse_unary()
            node = BinOp(op.text, self._number(node, op), self._number(right, op), op.column)
        return node

    def _number(self, node: Node, op: Tok) -> Node:
        if _is_bool(node):
            raise self.error(f"{op.text!r} needs numbers, not a condition", op.column)
        return node

    def parse_unary(self) -> Node:
        tok = self.take()
        if tok.kind == "op" and tok.text in "+-":
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise self.error(f"more than {_MAX_DEPTH} nested signs", tok.column)
            operand = self.parse_unary()
            self.depth -= 1
            self._number(operand, tok)
            return Neg(operand, tok.column) if tok.text == "-" else operand
        if tok.kind == "num":
            return Num(tok.value, tok.column)
        if tok.kind == "name":
            return Var(tok.text, tok.column)
        if tok.kind == "(":
            self.open_parens.append(tok.column)
            if len(self.open_parens) > _MAX_DEPTH:
                raise self.error(f"parentheses nest deeper than {_MAX_DEPTH}", tok.column)
            node = self.parse_or()
            close = self.peek()
            if close.kind != ")":
                if close.kind == "end":
                    raise self.error("'(' is never closed", tok.column)
                raise self.error(f"expected ')' or an operator before {close.text!r}", close.column)
            self.take()
            self.open_parens.pop()
            return node
        if tok.kind == ")":
            raise self.error("')' has no matching '(' or nothing before it", tok.column)
        if tok.kind == "end":
            raise self.error("the expression ends where a value was expected", tok.column)
        raise self.error(f"expected a number, a token or '(' but found {tok.text!r}", tok.column)


# -- compilation to closures ---------------------------------------------------------------

Env = Mapping[str, float]
_NAN = math.nan


def _compile(node: Node) -> Callable[[Env], float]:
    """Closures that compute a float (conditions yield 1.0 / 0.0)."""
    if isinstance(node, Num):
        value = node.value
        return lambda env: value
    if isinstance(node, Var):
        name = node.name
        return lambda env: env[name]
    if isinstance(node, Neg):
        f = _compile(node.operand)
        return lambda env: -f(env)
    if isinstance(node, BinOp):
        a, b = _compile(node.left), _compile(node.right)
        if node.op == "+":
            return lambda env: a(env) + b(env)
        if node.op == "-":
            return lambda env: a(env) - b(env)
        if node.op == "*":
            return lambda env: a(env) * b(env)

        def div(env: Env) -> float:
            d = b(env)
            return a(env) / d if d else _NAN  # NaN compares false

        return div
    if isinstance(node, Compare):
        a, b = _compile(node.left), _compile(node.right)
        op = node.op
        if op == "<":
            return lambda env: 1.0 if a(env) < b(env) else 0.0
        if op == "<=":
            return lambda env: 1.0 if a(env) <= b(env) else 0.0
        if op == ">":
            return lambda env: 1.0 if a(env) > b(env) else 0.0
        if op == ">=":
            return lambda env: 1.0 if a(env) >= b(env) else 0.0
        if op == "==":
            return lambda env: 1.0 if a(env) == b(env) else 0.0
        return lambda env: 1.0 if a(env) != b(env) else 0.0
    if isinstance(node, Logic):
        a, b = _compile(node.left), _compile(node.right)
        if node.op == "&&":
            return lambda env: 1.0 if a(env) and b(env) else 0.0
        return lambda env: 1.0 if a(env) or b(env) else 0.0
    f = _compile(node.operand)
    return lambda env: 0.0 if f(env) else 1.0


def _names(node: Node, out: list[str]) -> None:
    if isinstance(node, Var):
        if node.name not in out:
            out.append(node.name)
    elif isinstance(node, Neg | Not):
        _names(node.operand, out)
    elif isinstance(node, BinOp | Compare | Logic):
        _names(node.left, out)
        _names(node.right, out)


_PREC = {"||": 1, "&&": 2, "!": 3, "cmp": 4, "+": 5, "-": 5, "*": 6, "/": 6, "neg": 7}


def unparse(node: Node, number: Callable[[float], str] | None = None) -> str:
    """Compact text of ``node`` (what is uploaded to a PMTR_001; fully parenthesised)."""
    fmt = number or (lambda v: f"{v:g}")
    if isinstance(node, Num):
        return fmt(node.value)
    if isinstance(node, Var):
        return node.name
    if isinstance(node, Neg):
        return f"-{_wrap(node.operand, fmt)}"
    if isinstance(node, Not):
        return f"!{_wrap(node.operand, fmt)}"
    left, right = _wrap(node.left, fmt), _wrap(node.right, fmt)
    return f"{left}{node.op}{right}"


def _wrap(node: Node, fmt: Callable[[float], str]) -> str:
    text = unparse(node, fmt)
    return text if isinstance(node, Num | Var) else f"({text})"


@dataclass(frozen=True)
class Expression:
    """A parsed, type-checked and compiled expression."""

    source: str
    tree: Node
    names: tuple[str, ...]
    _fn: Callable[[Env], float]

    @property
    def clock_names(self) -> tuple[str, ...]:
        """The clock tokens it reads (``hour`` ...): it needs the site's time zone."""
        return tuple(n for n in self.names if n in CLOCK_TOKENS)

    def evaluate(self, env: Env) -> bool:
        """True/False for ``env`` (token -> SI value). Missing tokens raise ``KeyError``."""
        return bool(self._fn(env))

    def __str__(self) -> str:
        return self.source


def parse(source: str) -> Expression:
    """Parse, type-check and compile ``source``; raises :class:`ExprError`."""
    if not isinstance(source, str):
        raise ExprError(f"expected text, got {type(source).__name__}", 1, str(source))
    if len(source) > 4096:
        raise ExprError(f"the expression is {len(source)} characters long (at most 4096)", 1, "")
    tree = _Parser(source).parse()
    names: list[str] = []
    _names(tree, names)
    return Expression(source, tree, tuple(names), _compile(tree))
