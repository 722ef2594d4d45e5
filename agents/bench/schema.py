"""Benchmark and sweep files on OmegaConf structured configs: a dataclass is the schema.

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
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

T = TypeVar("T")


class SchemaError(ValueError):
    """A file does not fit its schema; the message names the file, the key and the fix."""


def read_yaml(path: Path, what: str) -> Any:
    """``yaml.safe_load`` of ``path`` (nothing in the file is run), errors naming the file."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SchemaError(f"{what} {path} not found") from None
    except yaml.YAMLError as exc:
        raise SchemaError(f"{what} {path} is not valid YAML: {exc}") from None


def load_structured(data: Any, schema: type[T], where: str) -> T:
    """``data`` (parsed YAML) validated against the dataclass ``schema``.

    :param where: the error prefix, e.g. ``"sweep configs/sweeps/x.yaml"``.
    :raises SchemaError: an unknown key, a value of the wrong type, a missing required key.
    """
    if not isinstance(data, dict):
        raise SchemaError(f"{where} must be a mapping (key: value), not {type(data).__name__}")
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, OmegaConf.create(data))
        result = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise SchemaError(_describe(exc, schema, where)) from None
    assert isinstance(result, schema)
    return result


def _describe(exc: OmegaConfBaseException, schema: type, where: str) -> str:
    key = getattr(exc, "full_key", None) or ""
    first = str(getattr(exc, "msg", exc)).splitlines()[0]
    if isinstance(exc, ConfigKeyError):
        valid = ", ".join(_field_names(schema, key.rsplit(".", 1)[0] if "." in key else ""))
        return f"{where}: {key}: unknown key; valid keys: {valid}"
    if isinstance(exc, MissingMandatoryValue):
        return f"{where}: missing required key {key!r}"
    if isinstance(exc, ValidationError):
        return f"{where}: {key}: {first}"
    return f"{where}: {key + ': ' if key else ''}{first}"


def _field_names(schema: type, parent: str) -> list[str]:
    """The field names of the dataclass at dotted ``parent`` inside ``schema``."""
    node: Any = schema
    for part in filter(None, parent.split(".")):
        hints = typing.get_type_hints(node) if _is_dataclass_type(node) else {}
        if part not in hints:
            return []
        node = hints[part]
    return [f.name for f in dataclasses.fields(node)] if _is_dataclass_type(node) else []


def _is_dataclass_type(node: Any) -> bool:
    return isinstance(node, type) and dataclasses.is_dataclass(node)


def choice(value: Any, choices: tuple[Any, ...], where: str, key: str) -> None:
    """Raise :class:`SchemaError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise SchemaError(
            f"{where}: {key} = {value!r} is not valid; choose one of: "
            + ", ".join(map(str, choices))
        )


def at_least(value: float | None, low: float, where: str, key: str, unit: str = "") -> None:
    """Raise :class:`SchemaError` unless ``value`` is a finite number >= ``low`` (None passes)."""
    if value is None:
        return
    if not math.isfinite(value) or value < low:
        raise SchemaError(
            f"{where}: {key} = {value!r} must be >= {low:g}{' ' + unit if unit else ''}"
        )


def as_plain(node: Any) -> Any:
    """A DictConfig/ListConfig (or dataclass) as plain dicts and lists."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.asdict(node)
    return node
