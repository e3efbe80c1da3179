"""Configuration values typed by their dataclass fields: one conversion for YAML files and ``--set`` overrides.

PyYAML follows YAML 1.1, which reads ``3e-3`` (no dot) as a string, and ``--set key=value`` values are read as
YAML too; so every value is converted to the type its field declares, or refused with one line naming the key
(``train.steps: 'abc' is not an integer``). The rules, the same for every section (``model`` included):

* ``int``: integers, integral floats (``2.0``, ``1e3``) and strings of them; not booleans, not ``2.5``.
* ``float``: numbers and numeric strings (``"1e-3"``); an int becomes a float; nan and inf are refused.
* ``bool``: booleans, ``0``/``1``, and the words true/false, yes/no, on/off (any case).
* ``str``: strings; an integer is taken as its digits (``run_dir: 2024``); anything else is refused.
* ``Optional[X]``: also null (``null``, ``~`` or nothing in YAML) and the words none/null (any case).
* ``List``: a list. A nested dataclass (``model.sparsity``): a mapping, converted key by key.

This module imports nothing of the project, so ``model/`` and ``training/`` can both use it.
"""

import dataclasses
import math
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, reported before any process starts; the message names the key and the fix."""


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
NONE_WORDS = ("none", "null")


def build(cls, data: dict, where: str):
    """An instance of the dataclass ``cls`` from plain data, each value converted to its field's type."""
    return cls(**coerce_fields(cls, data, where))


def coerce_fields(cls, data: dict, where: str) -> dict:
    """``data`` with every value converted to the type of ``cls``'s field of that name; keys are named
    ``<where>.<field>`` in errors."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return {name: coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as the type ``annotation`` names (see the module docstring), else a ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if type(None) in args and _is_none(value):
            return None
        options = [a for a in args if a is not type(None)]
        return coerce(value, options[0], key) if len(options) == 1 else value
    if dataclasses.is_dataclass(annotation):
        return _nested(value, annotation, key)
    if annotation is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{key}: {value!r} is not a list (write [a, b])")
    convert = _SCALARS.get(annotation)
    return convert(value, key) if convert else value


def _is_none(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)


def _nested(value, cls, key: str):
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        names = [f.name for f in dataclasses.fields(cls)]
        raise ConfigError(f"{key}: {value!r} is not a mapping; write {key}.<key>=value with a key of {names}")
    return build(cls, value, key)


def _number(value):
    """A finite float from a number or numeric string, else None (booleans are not numbers here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _to_int(value, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())  # exact, even beyond float precision
        except ValueError:
            pass
    number = _number(value)
    if number is None or not number.is_integer():
        raise ConfigError(f"{key}: {value!r} is not an integer")
    return int(number)


def _to_float(value, key: str) -> float:
    number = _number(value)
    if number is None:
        what = "a finite number" if _number_or_nonfinite(value) else "a number"
        raise ConfigError(f"{key}: {value!r} is not {what}")
    return number


def _number_or_nonfinite(value) -> bool:
    try:
        return not isinstance(value, bool) and not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _to_bool(value, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    word = value.strip().lower() if isinstance(value, str) else None
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{key}: {value!r} is not true or false (also accepted: yes/no, on/off, 1/0)")


def _to_str(value, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: {value!r} is not a string; put it in quotes")


_SCALARS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}
