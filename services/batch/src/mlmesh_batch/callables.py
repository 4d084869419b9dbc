"""Preprocess and postprocess stages: Python callables registered by name.

A job names a callable (``text.normalize``) and gives it parameters; no code
travels over the wire. Each callable maps one value to one value; a value it
cannot take raises RowError, and only that row fails (it lands in the errors
output with the stage and the reason). Parameters are checked when the job is
submitted (``check_parameters``): a bad one refuses the job.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_TEXT = 100_000  # characters a text callable accepts


class RowError(Exception):
    """The value of one row cannot be processed (the message says why)."""


class ParameterError(ValueError):
    """A callable's parameters are wrong (field, description)."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(description)
        self.field = field
        self.description = description


@dataclass(frozen=True)
class Callable_:
    name: str
    description: str
    parameters: Mapping[str, tuple[type, Any]]  # name -> (type, default)
    make: Callable[[Mapping[str, Any]], Callable[[Any], Any]]


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise RowError(f"expected a text, got {type(value).__name__}")
    if len(value) > MAX_TEXT:
        raise RowError(f"text longer than {MAX_TEXT} characters")
    return value


def _normalize(params: Mapping[str, Any]) -> Callable[[Any], Any]:
    lower = bool(params["lowercase"])
    limit = int(params["max_chars"])

    def apply(value: Any) -> str:
        text = re.sub(r"\s+", " ", _text(value)).strip()
        if not text:
            raise RowError("empty text")
        text = text.lower() if lower else text
        return text[:limit] if limit else text

    return apply


def _template(params: Mapping[str, Any]) -> Callable[[Any], Any]:
    template = str(params["template"])
    if template.count("{text}") != 1:
        raise ParameterError("template", "must hold {text} exactly once")
    before, after = template.split("{text}")

    def apply(value: Any) -> str:
        return before + _text(value) + after

    return apply


def _round(params: Mapping[str, Any]) -> Callable[[Any], Any]:
    digits = int(params["digits"])
    if not 0 <= digits <= 10:
        raise ParameterError("digits", "must be 0 to 10")

    def apply(value: Any) -> list[float]:
        if value is None:
            raise RowError("no vector")
        out = [round(float(x), digits) for x in value]
        if not all(math.isfinite(x) for x in out):
            raise RowError("the vector holds a NaN or an infinity")
        return out

    return apply


def _label(params: Mapping[str, Any]) -> Callable[[Any], Any]:
    labels = params["labels"]
    if not isinstance(labels, list) or not labels or len(labels) > 10_000:
        raise ParameterError("labels", "must be a list of 1 to 10000 names")
    names = [str(label)[:200] for label in labels]

    def apply(value: Any) -> str:
        if not isinstance(value, int | float) or int(value) != value:
            raise RowError(f"expected a class index, got {str(value)[:40]}")
        index = int(value)
        if not 0 <= index < len(names):
            raise RowError(f"class {index} has no label (there are {len(names)})")
        return names[index]

    return apply


def _pixels(params: Mapping[str, Any]) -> Callable[[Any], Any]:
    size = int(params["size"])
    if not 1 <= size <= 4096:
        raise ParameterError("size", "must be 1 to 4096")

    def apply(value: Any) -> list[float]:
        if isinstance(value, str):
            try:
                numbers = [float(x) for x in value.replace(",", " ").split()]
            except ValueError:
                raise RowError("not a list of numbers") from None
        elif value is None:
            raise RowError("no pixels")
        else:
            numbers = [float(x) for x in value]
        if len(numbers) != size:
            raise RowError(f"expected {size} numbers, got {len(numbers)}")
        if not all(math.isfinite(x) for x in numbers):
            raise RowError("a pixel is NaN or infinite")
        return numbers

    return apply


REGISTERED: dict[str, Callable_] = {
    c.name: c
    for c in [
        Callable_(
            "text.normalize",
            "Collapses whitespace and trims; `lowercase` (bool, false), `max_chars` "
            "(int, 0: no cut). A row that is not a text, or empty after trimming, fails.",
            {"lowercase": (bool, False), "max_chars": (int, 0)},
            _normalize,
        ),
        Callable_(
            "text.template",
            "Puts the text into `template` (string holding {text} once), e.g. a prompt. "
            "A row that is not a text fails.",
            {"template": (str, "{text}")},
            _template,
        ),
        Callable_(
            "vector.round",
            "Rounds every number of a vector to `digits` (int, 4) decimals. A row "
            "with no vector or a NaN fails.",
            {"digits": (int, 4)},
            _round,
        ),
        Callable_(
            "class.label",
            "Turns a class index into its name from `labels` (list of strings). An "
            "index out of range fails the row.",
            {"labels": (list, None)},
            _label,
        ),
        Callable_(
            "numbers.parse",
            "Turns a text of numbers (spaces or commas) or a list into `size` (int, 64) "
            "floats, e.g. pixels for a classifier. A row of another length fails.",
            {"size": (int, 64)},
            _pixels,
        ),
    ]
}


def check_parameters(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The callable's parameters with defaults filled in; raises
    ParameterError for an unknown, missing or mistyped one, KeyError for an
    unknown callable."""
    spec = REGISTERED[name]
    for key in params:
        if key not in spec.parameters:
            raise ParameterError(key[:40], f"{name} takes no parameter {key[:40]!r}")
    out: dict[str, Any] = {}
    for key, (kind, default) in spec.parameters.items():
        value = params.get(key, default)
        if value is None:
            raise ParameterError(key, "is required")
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # Struct numbers are doubles
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ParameterError(key, f"must be a {kind.__name__}")
        out[key] = value
    spec.make(out)  # the callable's own checks (raise ParameterError)
    return out


def make(name: str, params: Mapping[str, Any]) -> Callable[[Any], Any]:
    return REGISTERED[name].make(params)
