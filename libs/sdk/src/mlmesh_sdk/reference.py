"""The text form of a ModelReference: `name`, `name/3` or `name@alias`.

The name rules mirror the registry's (mlmesh.common.v1.ModelReference), so a
typo fails here with a clear message instead of as a round trip to the server.
"""

from __future__ import annotations

import re

from mlmesh.common.v1.model_reference_pb2 import ModelReference

MODEL_NAME = re.compile(r"[a-z][a-z0-9-]{1,62}")
ALIAS_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
_VERSION = re.compile(r"[1-9][0-9]*")
_MAX_VERSION = 2**63 - 1
_FORMS = "expected NAME, NAME/VERSION or NAME@ALIAS"


def parse_reference(text: str) -> ModelReference:
    """Parses `name` (newest version), `name/3` (version 3) or `name@alias`.

    Raises ValueError, naming the bad part, for anything else.
    """
    if not isinstance(text, str):
        raise TypeError(f"a model reference is a str, not {type(text).__name__}")
    if not text:
        raise ValueError(f"empty model reference; {_FORMS}")
    if text.count("/") + text.count("@") > 1:
        raise ValueError(f"model reference {text!r} has more than one '/' or '@'; {_FORMS}")
    if "/" in text:
        name, version = text.split("/")
        _check_model(text, name)
        if not _VERSION.fullmatch(version):
            raise ValueError(
                f"model reference {text!r}: version {version!r} must be a positive "
                "integer without sign or leading zeros"
            )
        number = int(version)
        if number > _MAX_VERSION:
            raise ValueError(f"model reference {text!r}: version {version} is out of range")
        return ModelReference(model=name, version=number)
    if "@" in text:
        name, alias = text.split("@")
        _check_model(text, name)
        if not ALIAS_NAME.fullmatch(alias):
            raise ValueError(
                f"model reference {text!r}: alias {alias!r} must be 1 to 63 lowercase "
                "letters, digits or '-', starting with a letter"
            )
        return ModelReference(model=name, alias=alias)
    _check_model(text, text)
    return ModelReference(model=text)


def _check_model(text: str, name: str) -> None:
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"model reference {text!r}: model name {name!r} must be 2 to 63 lowercase "
            f"letters, digits or '-', starting with a letter; {_FORMS}"
        )


def format_reference(reference: ModelReference) -> str:
    """The text form of a reference (the inverse of parse_reference)."""
    selector = reference.WhichOneof("selector")
    if selector == "version":
        return f"{reference.model}/{reference.version}"
    if selector == "alias":
        return f"{reference.model}@{reference.alias}"
    return reference.model
