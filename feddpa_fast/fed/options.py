"""Declared options: a dataclass field that carries its help, type, choices and range, so the
CLI flags, the TOML config and the Flower run config are all derived from one declaration
(``fed/run_config.py``, docs/ARCHITECTURE.md §3), and every value is checked before anything loads.
"""
from __future__ import annotations

import builtins
import dataclasses
import math
from pathlib import Path

from ..errors import FeddpaError

__all__ = ["ConfigError", "option", "check_options", "flag", "declared_fields"]


class ConfigError(FeddpaError, ValueError):
    """A configuration value out of range, of the wrong type, or not one of the choices; the
    message names the flag."""


def option(default, help: str, *, type=None, choices=None, minimum=None, maximum=None,
           above=None, below=None, optional: bool = False):
    """A dataclass field with what the CLI and the checks need.

    Args:
        default: the default value.
        help: one line for ``--help``.
        type: int, float, str or tuple (comma-separated strings); default: ``type(default)``.
        choices: the allowed values (``None`` counts as allowed when ``optional``).
        minimum / maximum: inclusive bounds; above / below: exclusive bounds.
        optional: ``None`` is allowed (the Flower run config writes it as 0 or "").

    Returns:
        A ``dataclasses.field``.
    """
    kind = type or builtins.type(default)
    meta = {"help": help, "type": kind, "choices": tuple(choices) if choices else None,
            "minimum": minimum, "maximum": maximum, "above": above, "below": below,
            "optional": optional}
    return dataclasses.field(default=default, metadata={"option": meta})


def declared_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` declared with ``option``, in order."""
    return [f for f in dataclasses.fields(cls) if "option" in f.metadata]


def flag(field: dataclasses.Field, prefix: str = "") -> str:
    """``--local-epochs`` for ``local_epochs``; ``--weighting-k`` with prefix ``weighting``."""
    name = field.name.replace("_", "-")
    return f"--{prefix}-{name}" if prefix else f"--{name}"


def _type_ok(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)
    return isinstance(value, kind)


def _range_error(value, meta) -> str | None:
    if meta["type"] not in (int, float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be finite"
    for key, bad, words in (("minimum", lambda v, b: v < b, ">="), ("maximum", lambda v, b: v > b,
                            "<="), ("above", lambda v, b: v <= b, ">"),
                            ("below", lambda v, b: v >= b, "<")):
        bound = meta[key]
        if bound is not None and bad(value, bound):
            return f"must be {words} {bound}"
    return None


def check_options(obj, prefix: str = "") -> None:
    """Checks every declared field of the dataclass instance ``obj``.

    Raises:
        ConfigError: naming the flag, for a wrong type, a value not among the choices or out
            of range.
    """
    for field in declared_fields(type(obj)):
        meta, value = field.metadata["option"], getattr(obj, field.name)
        name = flag(field, prefix)
        if value is None:
            if meta["optional"]:
                continue
            raise ConfigError(f"{name} must be given (it has no 'unset' value)")
        if not _type_ok(value, meta["type"]):
            raise ConfigError(f"{name} must be of type {meta['type'].__name__}, got {value!r}")
        if meta["choices"] and value not in meta["choices"]:
            allowed = ", ".join(str(c) for c in meta["choices"])
            raise ConfigError(f"{name} must be one of {allowed}; got {value!r}")
        problem = _range_error(value, meta)
        if problem:
            raise ConfigError(f"{name} {problem}, got {value!r}")


def resolved_source(value: str) -> str:
    """A --model / --data value as a run records it: the built-in names as they are, a
    directory as its absolute path."""
    return value if value in ("builtin", "smollm2") else str(Path(value).resolve())
