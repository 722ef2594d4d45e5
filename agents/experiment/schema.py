"""Suite and sweep files on OmegaConf structured configs: a dataclass is the schema.

The run config (:mod:`agents.experiment.config`) and these files are the one config system of
the experiment layer: YAML validated into dataclasses, unknown keys rejected.

:func:`load_structured` reads a YAML file, merges it over ``OmegaConf.structured(schema)``
(unknown keys and wrongly typed values are rejected there, missing mandatory values when it
is turned into the dataclass) and returns the dataclass instance. Every error is a
:class:`SchemaError` that names the file, the dotted key and what to do, e.g.::

    sweep configs/sweeps/x.yaml: scheduler.grace: unknown key; valid keys: kind,
    grace_period, reduction_factor

Checks OmegaConf cannot express (a value among choices, a range, a cross-field rule) are
the dataclass' ``check(where)`` methods, which raise :class:`SchemaError` themselves; see
:func:`choice` and :func:`at_least`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

T = TypeVar("T")


class SchemaError(ValueError):
    """A file does not fit its schema; the message names the file, the key and the fix."""


def read_yaml(path: Path, what: str, error: type[Exception] = SchemaError) -> Any:
    """``yaml.safe_load`` of ``path`` (nothing in the file is run), errors naming the file."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{what} {path} not found") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {exc}") from None


def load_structured(
    data: Any, schema: type[T], where: str, error: type[Exception] = SchemaError
) -> T:
    """``data`` (parsed YAML) validated against the dataclass ``schema``.

    :param where: the error prefix, e.g. ``"sweep configs/sweeps/x.yaml"``.
    :param error: the exception class to raise (a subclass of :class:`SchemaError`).
    :raises SchemaError: an unknown key, a value of the wrong type, a missing required key.
    """
    if not isinstance(data, dict):
        raise error(f"{where} must be a mapping (key: value), not {type(data).__name__}")
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, OmegaConf.create(data))
        result = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise error(_describe(exc, schema, where)) from None
    assert isinstance(result, schema)
    return result


def _describe(exc: OmegaConfBaseException, schema: type, where: str) -> str:
    key = getattr(exc, "full_key", None) or ""
    first = str(getattr(exc, "msg", exc)).splitlines()[0]
    if isinstance(exc, ConfigKeyError):
        parts = _split_key(key)
        valid = ", ".join(_field_names(schema, parts[:-1]))
        leaf = parts[-1] if parts else key
        return f"{where}: {key}: unknown key {leaf!r}; valid keys: {valid}"
    if isinstance(exc, MissingMandatoryValue):
        return f"{where}: missing required key {key!r}"
    if isinstance(exc, ValidationError):
        return f"{where}: {key}: {first}"
    return f"{where}: {key + ': ' if key else ''}{first}"


def _split_key(key: str) -> list[str]:
    """``"runs[0].colour"`` -> ``["runs", "[0]", "colour"]``."""
    return re.findall(r"\[[^\]]*\]|[^.\[\]]+", key)


def _field_names(schema: type, parents: list[str]) -> list[str]:
    """The field names of the dataclass reached by the key ``parents`` inside ``schema``
    (through ``list[X]`` items and ``dict[str, X]`` values)."""
    node: Any = schema
    pending = list(parents)
    while pending:
        part = pending.pop(0)
        if _is_dataclass_type(node):
            hints = typing.get_type_hints(node)
            if part not in hints:
                return []
            node = hints[part]
        origin = typing.get_origin(node)
        while origin in (list, dict, types.UnionType, typing.Union):
            args = [a for a in typing.get_args(node) if a is not type(None)]
            if origin in (list, dict) and pending:
                pending.pop(0)  # the index or the key
            node = args[-1]
            origin = typing.get_origin(node)
    return [f.name for f in dataclasses.fields(node)] if _is_dataclass_type(node) else []


def _is_dataclass_type(node: Any) -> bool:
    return isinstance(node, type) and dataclasses.is_dataclass(node)


def choice(
    value: Any,
    choices: tuple[Any, ...],
    where: str,
    key: str,
    error: type[Exception] = SchemaError,
) -> None:
    """Raise ``error`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise error(
            f"{where}: {key} = {value!r} is not valid; choose one of: "
            + ", ".join(map(str, choices))
        )


def at_least(
    value: float | None,
    low: float,
    where: str,
    key: str,
    unit: str = "",
    error: type[Exception] = SchemaError,
) -> None:
    """Raise ``error`` unless ``value`` is a finite number >= ``low`` (None passes)."""
    if value is None:
        return
    if not math.isfinite(value) or value < low:
        raise error(f"{where}: {key} = {value!r} must be >= {low:g}{' ' + unit if unit else ''}")
