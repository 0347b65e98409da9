"""`--engine-option KEY=VALUE` -> keyword arguments of `EngineConfig`, each value parsed as the
type of the field it sets (read from the dataclass itself, so a new field needs nothing here):

    int               "4096"
    float             "1e-3", "0.4"
    bool              "true" / "false" (or "1" / "0")
    tuple[int, ...]   "1,2,4" (one value: "4")
    str               as given
    X | None          "none", or an X

A key that is no field, or a value its field's type cannot take, is a ValueError naming the
option. What the values mean is EngineConfig's to check (where the config is built).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from zipserve.engine.config import EngineConfig

_TRUE, _FALSE = ("true", "1"), ("false", "0")


def engine_option_types() -> dict[str, Any]:
    """Field name -> type, for every EngineConfig field its constructor takes."""
    hints = typing.get_type_hints(EngineConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(EngineConfig) if f.init}


def parse_engine_options(pairs: list[str] | None) -> dict[str, Any]:
    """["num_pages=4096", "cuda_graphs=false", "graph_batch_sizes=1,2,4"] -> {"num_pages":
    4096, "cuda_graphs": False, "graph_batch_sizes": (1, 2, 4)}."""
    known = engine_option_types()
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--engine-option: expected key=value, got {pair!r}")
        if key not in known:
            raise ValueError(
                f"--engine-option {key}: no such engine option; known: {', '.join(known)}"
            )
        try:
            out[key] = parse_value(value, known[key])
        except ValueError as e:
            raise ValueError(f"--engine-option {key}={value}: {e}") from None
    return out


def parse_value(text: str, kind: Any) -> Any:
    """text as a value of type `kind` (the types EngineConfig's fields use); ValueError."""
    text = text.strip()
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() == "none":
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise ValueError(f"cannot parse a value of type {kind}")
        return parse_value(text, inner[0])
    if typing.get_origin(kind) is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise ValueError(f"cannot parse a value of type {kind}")
        return tuple(parse_value(item, args[0]) for item in text.split(","))
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"expected true or false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if kind is str:
        return text
    raise ValueError(f"cannot parse a value of type {kind}")
