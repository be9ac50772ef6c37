"""Typed run configs: nested dataclasses loaded from YAML plus `key=value` overrides.

Each component owns a small dataclass (model preset, denoiser, data, optimiser, ...) and a run
composes them. Unknown keys are an error that names the key, the file and the closest valid key;
a value of the wrong type (a string where a section or a number is expected) is an error that
names the key and what it takes, before any code reads it.

It lives in pipelines/, beside storage and manifests, because both pipelines/ (stage configs) and
jobs/ (run configs, the command line) load configs, and pipelines/ may not import jobs/.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _describe(tp: Any) -> str:
    """A type as a person reads it in an error: `a number`, `a list`, `a section (a: ..., b: ...)`."""
    if tp is Any:
        return "anything"
    if dataclasses.is_dataclass(tp):
        return f"a section with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    if _is_union(tp):
        return " or ".join(dict.fromkeys(_describe(a) for a in typing.get_args(tp)))
    origin = typing.get_origin(tp) or tp
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null",
             list: "a list", tuple: "a list", dict: "a mapping"}
    return names.get(origin, getattr(origin, "__name__", str(tp)))


class _Mismatch(Exception):
    """A value that does not fit a type (caught and reported with the key by `_convert`)."""


def _convert(value: Any, tp: Any, where: str) -> Any:
    """`value` as type `tp`, or ValueError naming `where` and what it takes.

    Conversions are the ones YAML and the command line need and nothing more: `2e-3` (a string to
    YAML 1.1) to a float, a list to a tuple, a single value to a one-element list
    (`data.datasets=/data/x`), a mapping to a section. An int stays an int where a float is expected.
    """
    try:
        return _fit(value, tp, where)
    except _Mismatch:
        raise ValueError(f"{where} must be {_describe(tp)}, got {value!r}") from None


def _fit(value: Any, tp: Any, where: str) -> Any:
    if tp is Any or tp is object:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # Exact type matches first, so `bool | str` keeps "auto" a string and `float | None` an int a number.
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: not _matches_exactly(value, a)):
            try:
                return _fit(value, arg, where)
            except (_Mismatch, ValueError):
                continue
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _Mismatch
        return from_dict(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        items = list(value) if isinstance(value, (list, tuple)) else None
        if items is None:
            if isinstance(value, dict) or (args and _fits_none(args[0], value)):
                raise _Mismatch
            items = [value]                               # one value where a list is expected: a one-element list
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"{where} must be a list of {len(args)} values, got {value!r}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return value
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return value                                  # an int is a number too (kept as written: configs hash as given)
        if isinstance(value, str):                        # YAML 1.1 reads `2e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)                             # `name=2024`, `seed_tag=7`: YAML read a number
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    return value


def _matches_exactly(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    return isinstance(origin, type) and isinstance(value, origin) and not (origin is int and isinstance(value, bool))


def _fits_none(tp: Any, value: Any) -> bool:
    return value is None and tp is not type(None)


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a plain dict, recursing into nested dataclass fields. `where` is
    the dotted key of this section (for messages); "" at the top."""
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{where or 'the config'} must be {_describe(cls)}, got {data!r}")
    data = dict(data or {})
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(types_), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(types_))}"
        raise ValueError(f"unknown key {key!r}{' in ' + where if where else ''}{hint}")
    kwargs = {name: _convert(value, types_[name], _key(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:                              # a required field left out
        raise ValueError(f"{where or 'the config'}: {err}") from None


def to_dict(obj: Any) -> Any:
    """Plain dict/list form of a (nested) dataclass, for YAML, JSON and manifests."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, leaf value) pairs of a nested dict, the keys `apply_overrides` takes."""
    if isinstance(d, dict) and d:
        return [kv for k, v in d.items() for kv in flatten(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), d)]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` strings applied onto a nested dict; values are parsed as YAML scalars."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"{key.strip()}: {raw!r} is not a YAML value ({str(err).splitlines()[0]})") from None
    return data


def override(obj: T, values: dict[str, Any], where: str = "") -> T:
    """`obj` (a config dataclass) with `values` set on top, as a YAML section of overrides holds
    them (`{data.batch_size: 32, optim: {lr: 1e-3}}`): a mapping under a section key merges into
    that section key by key; any other field (a dict-typed one too, e.g. a search space) is set
    whole, like one `key=value` on the command line."""
    import json

    merged = to_dict(obj)
    for key, value in leaves(type(obj), values):
        merged = apply_overrides(merged, [f"{key}={json.dumps(value)}"])
    return from_dict(type(obj), merged, where)


def leaves(cls: type, values: dict[str, Any], prefix: str = ""):
    """(dotted key, value) pairs of `values`, descending into mappings only where `cls` has a section."""
    for key, value in values.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and _section_at(cls, full) is not None:
            yield from leaves(cls, value, f"{full}.")
        else:
            yield full, value


def _section_at(cls: type, dotted: str) -> type | None:
    """The config section (dataclass) at a dotted key of `cls`, or None when it is a plain field."""
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp) or part not in _field_types(tp):
            return None
        tp = _field_types(tp)[part]
        if _is_union(tp):
            tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)
    return tp if dataclasses.is_dataclass(tp) else None


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Load `cls` from a YAML file (or its defaults) with `key=value` overrides on top."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
    data = apply_overrides(data, list(overrides))
    try:
        return from_dict(cls, data)
    except ValueError as err:
        raise ValueError(f"{err} (config file {path})" if path is not None else str(err)) from None


def dump(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
