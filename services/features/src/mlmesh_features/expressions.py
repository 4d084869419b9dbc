"""Row-level feature expressions: a small, safe language.

A row feature is an expression over its source's columns and the view's
other row features, e.g. ``amount * 1.2`` or ``(clicks + 1) / (views + 1)``.
The grammar is a subset of Python's expression syntax, parsed with ``ast``
and never evaluated by Python: numbers, strings, ``True``/``False``, names,
``+ - * / // %``, unary ``-``, comparisons, ``and``/``or``/``not``,
``a if cond else b`` and the functions in ``FUNCTIONS``. Anything else
(attributes, calls of other names, subscripts, lambdas, comprehensions) is
refused with the column where it starts.

The same tree is type-checked here (``infer_type``), evaluated over pandas
columns for the batch path (``evaluate``) and, for the streaming path,
rendered into Flink SQL by the job compiler.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

MAX_EXPRESSION_CHARS = 2000
MAX_NODES = 200

# The types a feature or column may have (mlmesh.features.v1.ValueType's
# scalar kinds).
INT64, DOUBLE, STRING, BOOL = "int64", "double", "string", "bool"
NUMERIC = {INT64, DOUBLE}

# Functions an expression may call: name -> (argument count, result type
# given the argument types, or None when the arguments do not fit).
FUNCTIONS: dict[str, tuple[int, Callable[[list[str]], str | None]]] = {
    "abs": (1, lambda t: t[0] if t[0] in NUMERIC else None),
    "log1p": (1, lambda t: DOUBLE if t[0] in NUMERIC else None),
    "sqrt": (1, lambda t: DOUBLE if t[0] in NUMERIC else None),
    "lower": (1, lambda t: STRING if t[0] == STRING else None),
    "upper": (1, lambda t: STRING if t[0] == STRING else None),
    "length": (1, lambda t: INT64 if t[0] == STRING else None),
    "coalesce": (2, lambda t: t[0] if t[0] == t[1] else (DOUBLE if set(t) <= NUMERIC else None)),
}


class ExpressionError(ValueError):
    """A bad expression; ``column`` is 1-based within the expression."""

    def __init__(self, message: str, column: int = 1) -> None:
        super().__init__(message)
        self.column = column


@dataclass(frozen=True)
class Expression:
    """A parsed expression and the names it reads."""

    text: str
    tree: ast.expr
    names: frozenset[str]


_BINARY = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
}
_COMPARE = {ast.Eq: "=", ast.NotEq: "<>", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}


def parse(text: str) -> Expression:
    """The expression ``text``; ExpressionError when it is not one."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"longer than {MAX_EXPRESSION_CHARS} characters")
    if not text.strip():
        raise ExpressionError("empty expression")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as error:
        raise ExpressionError(f"syntax error: {error.msg}", error.offset or 1) from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise ExpressionError(f"more than {MAX_NODES} terms")
    for node in nodes:
        _check_node(node)
    called = {id(n.func) for n in nodes if isinstance(n, ast.Call)}
    names = {n.id for n in nodes if isinstance(n, ast.Name) and id(n) not in called}
    return Expression(text, tree, frozenset(names))


# Nodes with nothing to check beyond their type.
_PLAIN = (ast.BoolOp, ast.IfExp, ast.And, ast.Or, ast.Load, *_BINARY, *_COMPARE, ast.USub, ast.Not)


def _check_node(node: ast.AST) -> None:
    column = getattr(node, "col_offset", 0) + 1
    if isinstance(node, ast.Name):
        pass
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise ExpressionError(
                f"unknown function (known: {', '.join(sorted(FUNCTIONS))})", column
            )
        arity = FUNCTIONS[node.func.id][0]
        if len(node.args) != arity or node.keywords:
            raise ExpressionError(f"{node.func.id} takes {arity} argument(s)", column)
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, (bool, int, float, str)):
            raise ExpressionError("only numbers, strings and True/False are constants", column)
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise ExpressionError("unsupported operator", column)
    elif isinstance(node, ast.Compare):
        if not all(type(op) in _COMPARE for op in node.ops) or len(node.ops) != 1:
            raise ExpressionError("one comparison (== != < <= > >=) at a time", column)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.USub, ast.Not)):
            raise ExpressionError("unsupported unary operator", column)
    elif isinstance(node, _PLAIN):
        pass
    else:
        raise ExpressionError(f"{type(node).__name__} is not allowed in an expression", column)


def infer_type(expression: Expression, types: Mapping[str, str]) -> str:
    """The type of ``expression`` given the types of the names it reads;
    ExpressionError on a mismatch (every name must be in ``types``)."""
    return _type(expression.tree, types)


def _type(node: ast.expr, types: Mapping[str, str]) -> str:
    column = node.col_offset + 1
    if isinstance(node, ast.Name):
        return types[node.id]
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            return BOOL
        if isinstance(value, int):
            return INT64
        if isinstance(value, float):
            return DOUBLE
        return STRING
    if isinstance(node, ast.BinOp):
        left, right = _type(node.left, types), _type(node.right, types)
        if isinstance(node.op, ast.Add) and left == right == STRING:
            return STRING
        if left not in NUMERIC or right not in NUMERIC:
            raise ExpressionError(
                f"{_BINARY[type(node.op)]} needs numbers ({left}, {right})", column
            )
        if isinstance(node.op, ast.Div):
            return DOUBLE
        return INT64 if left == right == INT64 else DOUBLE
    if isinstance(node, ast.UnaryOp):
        operand = _type(node.operand, types)
        if isinstance(node.op, ast.Not):
            if operand != BOOL:
                raise ExpressionError(f"not needs a bool ({operand})", column)
            return BOOL
        if operand not in NUMERIC:
            raise ExpressionError(f"- needs a number ({operand})", column)
        return operand
    if isinstance(node, ast.Compare):
        left, right = _type(node.left, types), _type(node.comparators[0], types)
        if left != right and not {left, right} <= NUMERIC:
            raise ExpressionError(f"cannot compare {left} with {right}", column)
        return BOOL
    if isinstance(node, ast.BoolOp):
        for term in node.values:
            kind = _type(term, types)
            if kind != BOOL:
                raise ExpressionError(f"and/or need bools ({kind})", term.col_offset + 1)
        return BOOL
    if isinstance(node, ast.IfExp):
        if _type(node.test, types) != BOOL:
            raise ExpressionError("the condition of if/else must be a bool", column)
        then, other = _type(node.body, types), _type(node.orelse, types)
        if then == other:
            return then
        if {then, other} <= NUMERIC:
            return DOUBLE
        raise ExpressionError(f"if/else branches differ ({then}, {other})", column)
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        arguments = [_type(a, types) for a in node.args]
        result = FUNCTIONS[node.func.id][1](arguments)
        if result is None:
            raise ExpressionError(f"{node.func.id} does not take ({', '.join(arguments)})", column)
        return result
    raise ExpressionError(f"{type(node).__name__} is not allowed", column)  # pragma: no cover


def evaluate(expression: Expression, frame: pd.DataFrame) -> pd.Series:
    """``expression`` over the columns of ``frame``, one value per row."""
    value = _evaluate(expression.tree, frame)
    if not isinstance(value, pd.Series):
        value = pd.Series([value] * len(frame), index=frame.index)
    return value


def _evaluate(node: ast.expr, frame: pd.DataFrame) -> Any:
    if isinstance(node, ast.Name):
        return frame[node.id]
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, frame), _evaluate(node.right, frame)
        op = type(node.op)
        if op is ast.Add:
            return left + right
        if op is ast.Sub:
            return left - right
        if op is ast.Mult:
            return left * right
        if op is ast.Div:
            return _as_float(left) / _as_float(right)
        if op is ast.FloorDiv:
            return left // right
        return left % right
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, frame)
        return ~operand if isinstance(node.op, ast.Not) else -operand
    if isinstance(node, ast.Compare):
        left, right = _evaluate(node.left, frame), _evaluate(node.comparators[0], frame)
        comparison = type(node.ops[0])
        return {
            ast.Eq: lambda: left == right,
            ast.NotEq: lambda: left != right,
            ast.Lt: lambda: left < right,
            ast.LtE: lambda: left <= right,
            ast.Gt: lambda: left > right,
            ast.GtE: lambda: left >= right,
        }[comparison]()
    if isinstance(node, ast.BoolOp):
        values = [_evaluate(v, frame) for v in node.values]
        result = values[0]
        for value in values[1:]:
            result = (result & value) if isinstance(node.op, ast.And) else (result | value)
        return result
    if isinstance(node, ast.IfExp):
        test = _evaluate(node.test, frame)
        then, other = _evaluate(node.body, frame), _evaluate(node.orelse, frame)
        return pd.Series(np.where(test, then, other), index=frame.index)
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        args = [_evaluate(a, frame) for a in node.args]
        name = node.func.id
        if name == "abs":
            return abs(args[0])
        if name == "log1p":
            return np.log1p(_as_float(args[0]))
        if name == "sqrt":
            return np.sqrt(_as_float(args[0]))
        if name in ("lower", "upper", "length"):
            text = args[0] if isinstance(args[0], pd.Series) else pd.Series([args[0]] * len(frame))
            return {"lower": text.str.lower, "upper": text.str.upper, "length": text.str.len}[
                name
            ]()
        first, second = args
        if isinstance(first, pd.Series):
            return first.where(first.notna(), second)
        return second if first is None else first
    raise ExpressionError(f"{type(node).__name__} is not allowed")  # pragma: no cover


def _as_float(value: Any) -> Any:
    return value.astype("float64") if isinstance(value, pd.Series) else float(value)
