"""Dataclasses are the schema, YAML is plain data, `--section.key value` overrides.

Every verb has a config dataclass. A run's config is built in three layers: the dataclass
defaults, then a YAML file (`--config FILE`), then command-line overrides. Unknown keys and
values of the wrong type are `LlmlabError`s that name the key and, where one is close, the
valid key the user probably meant.
"""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from llmlab.errors import LlmlabError, closest, nearest

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def field(default=dataclasses.MISSING, help: str = "", **kw):
    """A dataclass field with a help string shown by `llmlab VERB --help`."""
    if isinstance(default, (list, dict)):
        value = default
        kw["default_factory"] = lambda: type(value)(value)
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return dataclasses.field(metadata={"help": help}, **kw)


def build(cls, data: dict | None = None, where: str = "config"):
    """Make a `cls` dataclass from a plain dict, checking every key and value type."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise LlmlabError(f"unknown key '{where}.{key}'{closest(name, names)}; "
                              f"valid keys: {', '.join(names)}")
        kwargs[name] = _check(value, hints[name], f"{where}.{name}")
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load(cls, path: str | Path | None = None, overrides: dict[str, str] | None = None):
    """Defaults < YAML file < `--section.key value` overrides, validated against `cls`."""
    data = read_yaml(path) if path else {}
    for dotted, text in (overrides or {}).items():
        _set_override(cls, data, dotted, text)
    return build(cls, data)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LlmlabError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LlmlabError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LlmlabError(f"{path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def _set_override(cls, data: dict, dotted: str, text: str):
    """Parse `text` by the type of the field that `dotted` names, and store it in `data`."""
    *sections, key = dotted.replace("-", "_").split(".")
    node, node_cls, prefix = data, cls, ""
    for i, section in enumerate(sections):
        hint = _field_types(node_cls).get(section)
        if hint is not None and _is_mapping(hint):  # free-form options: the rest of the name is a key path
            _set_mapping_key(node, [section, *sections[i + 1:], key], text, dotted)
            return
        if hint is None or not dataclasses.is_dataclass(hint):
            _unknown(node_cls, dotted, prefix, section)
        node = node.setdefault(section, {})
        node_cls, prefix = hint, f"{prefix}{section}."
    hint = _field_types(node_cls).get(key)
    if hint is None:
        _unknown(node_cls, dotted, prefix, key)
    node[key] = parse_text(text, hint, f"--{dotted}")


def _is_mapping(hint) -> bool:
    return hint is dict or typing.get_origin(hint) is dict


def _set_mapping_key(node: dict, path: list[str], text: str, dotted: str):
    """`--adapter.r 16` into a `dict` field: the value is read as YAML (16 → int, [a, b] → list)."""
    for name in path[:-1]:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise LlmlabError(f"--{dotted}: '{name}' is set to a {type(node).__name__} in the config file, "
                              "not a mapping of keys to values")
    try:
        node[path[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise LlmlabError(f"--{dotted} expects a YAML value, got '{text}' ({str(e).splitlines()[0]})") from None


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown(cls, dotted: str, prefix: str, key: str):
    """Name the bad option as the user typed it, and the closest valid one as they should type it."""
    match = nearest(key, _field_types(cls))
    hint = f" (did you mean '--{prefix}{match}'?)".replace("_", "-") if match else ""
    raise LlmlabError(f"unknown option '--{dotted}'{hint}; see --help for the valid options")


def parse_text(text: str, hint, where: str) -> Any:
    """Turn a command-line string into a value of type `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_optional(hint):
        if text.lower() in ("none", "null", ""):
            return None
        return parse_text(text, next(a for a in args if a is not type(None)), where)
    if hint is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise LlmlabError(f"{where} expects true or false, got '{text}'")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise LlmlabError(f"{where} expects {'an integer' if hint is int else 'a number'}, "
                              f"got '{text}'") from None
    if origin is list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        return [parse_text(t, args[0], where) for t in items]
    return _check(text, hint, where)


def _check(value, hint, where: str):
    """Check a YAML value against a type hint; nested dicts become nested dataclasses."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise LlmlabError(f"{where} must be a mapping of keys to values")
        return build(hint, value, where)
    if _is_optional(hint):
        return None if value is None else _check(value, next(a for a in args if a is not type(None)), where)
    if origin is Literal:
        if value not in args:
            raise LlmlabError(f"{where} must be one of {', '.join(map(str, args))}; got '{value}'"
                              f"{closest(str(value), map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, str):  # `--adapter.targets q_proj,v_proj`, or `targets: q_proj` in YAML
            return parse_text(value, hint, where)
        if not isinstance(value, list):
            raise LlmlabError(f"{where} expects a list, got {type(value).__name__} {value!r}")
        return [_check(v, args[0], where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise LlmlabError(f"{where} expects a mapping, got {type(value).__name__}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, str):  # YAML 1.1 reads `lr: 1e-3` as a string
        return parse_text(value, hint, where)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint)
                       and not (hint is int and isinstance(value, bool))):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise LlmlabError(f"{where} expects {name}, got {type(value).__name__} {value!r}")


def _is_optional(hint) -> bool:
    origin = typing.get_origin(hint)
    return origin in (Union, types.UnionType) and type(None) in typing.get_args(hint)


def describe(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """(option, default, help) rows for `--help`, nested sections flattened with dots."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        rows.append((f"--{prefix}{f.name.replace('_', '-')}", str(default), f.metadata.get("help", "")))
    return rows


def type_names(cls, prefix: str = "") -> dict[str, str]:
    """--option -> what it takes (INT, FLOAT, TEXT, LIST, a|b|c, KEY=VALUE …), for `--help`; flags take nothing."""
    names = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            names.update(type_names(hint, f"{prefix}{f.name}."))
        else:
            names[f"--{prefix}{f.name.replace('_', '-')}"] = _type_name(hint)
    return names


def _type_name(hint) -> str:
    if _is_optional(hint):
        return _type_name(next(a for a in typing.get_args(hint) if a is not type(None)))
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "|".join(map(str, typing.get_args(hint)))
    if origin is list:
        return _type_name(typing.get_args(hint)[0]) + ",…"
    if _is_mapping(hint):
        return "(.KEY VALUE)"
    return {bool: "", int: "INT", float: "FLOAT", str: "TEXT"}.get(hint, "VALUE")


def bool_keys(cls, prefix: str = "") -> set[str]:
    """Dotted names of boolean options, which may be given as bare flags (`--greedy`)."""
    hints = typing.get_type_hints(cls)
    keys = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= bool_keys(hints[f.name], f"{prefix}{f.name}.")
        elif hints[f.name] is bool:
            keys.add(prefix + f.name)
    return keys
