"""Typed configs: dataclasses read from YAML and overridden from the command line.

The pattern (what the trainer and the benchmark runner do)::

    from dataclasses import dataclass, field
    from vlm_grpo_ma.config import parse_config, save_config

    @dataclass
    class ModelArgs:
        model: str = field(default="tiny-qwen2.5-vl", metadata={"help": "Local path, hub id or tiny-model name."})

    @dataclass
    class RLArgs:
        lr: float = field(default=1e-6, metadata={"help": "Peak learning rate (AdamW)."})
        num_thoughts: int = field(default=4, metadata={"help": "K: thoughts sampled per prompt."})

    model_args, rl_args = parse_config((ModelArgs, RLArgs))        # reads sys.argv[1:]
    save_config((model_args, rl_args), f"{out_dir}/config.yaml")    # every run writes it

    # python train.py --config base.yaml --config exp.yaml --lr 2e-6

Resolution order, later wins: the dataclass defaults, then each ``--config FILE.yaml`` in the
order given, then every ``--field value`` on the command line.  The YAML file is flat: its keys
are field names of any of the dataclasses (a key no dataclass has is a :class:`ConfigError`
naming the key, the file and the closest field names).  Parsing and type conversion are
transformers' :class:`~transformers.HfArgumentParser` (one ``--field`` per dataclass field; its
``help`` is the field's ``metadata["help"]``; ``--flag`` / ``--no_flag`` for booleans; choices for
``Literal`` and ``Enum`` fields).  A field typed ``Optional[JsonObject]`` holds a JSON object: a
mapping in YAML, ``'{"key": 1}'`` on the command line.  YAML values are checked with the same
parser's types and choices, so a wrong type in a file is an error naming the file and key, not a crash later.
:func:`save_config` writes the resolved values as YAML that :func:`parse_config` reads back to
equal instances.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import json
import os
import typing
from pathlib import PurePath
from typing import Any, Optional, Sequence, Union

import yaml

__all__ = ["ConfigError", "JsonObject", "config_to_dict", "load_yaml", "parse_config", "save_config"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and key."""


DataclassTypes = Union[type, Sequence[type]]


def _as_types(dataclass_types: DataclassTypes) -> tuple[type, ...]:
    types = (dataclass_types,) if isinstance(dataclass_types, type) else tuple(dataclass_types)
    for t in types:
        if not dataclasses.is_dataclass(t):
            raise TypeError(f"{t!r} is not a dataclass type")
    return types


def _field_names(types: Sequence[type]) -> list[str]:
    return [f.name for t in types for f in dataclasses.fields(t) if f.init]


class JsonObject(str):
    """Field type of a string holding a JSON object (``Optional[JsonObject]``): a mapping in a
    YAML file, ``'{"key": 1}'`` on the command line; checked and stored canonically."""


def _is_json_type(hint: Any) -> bool:
    return hint is JsonObject or JsonObject in typing.get_args(hint)


def _json_fields(types: Sequence[type]) -> set[str]:
    """Names of the :class:`JsonObject` fields of ``types``."""
    names = set()
    for t in types:
        hints = typing.get_type_hints(t)
        names |= {f.name for f in dataclasses.fields(t) if f.init and _is_json_type(hints.get(f.name))}
    return names


def _normalise_json(instances: Sequence[Any], names: set[str]) -> None:
    """Check every JSON-object field and rewrite it canonically (``json.dumps``), so that a saved
    config reads back to an equal instance."""
    for inst in instances:
        for f in dataclasses.fields(inst):
            if f.name not in names:
                continue
            value = getattr(inst, f.name)
            if value is None or value == "":
                setattr(inst, f.name, None)
                continue
            try:
                obj = json.loads(value) if isinstance(value, str) else value
            except json.JSONDecodeError as e:
                raise ConfigError(f"--{f.name}: not valid JSON ({e}): {value!r}") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"--{f.name}: must be a JSON object (a mapping), got {type(obj).__name__}: {value!r}")
            setattr(inst, f.name, json.dumps(obj))


def load_yaml(path: str | os.PathLike, types: DataclassTypes) -> dict[str, Any]:
    """The mapping of a flat YAML config file, its keys checked against the dataclasses' fields.

    Raises:
        ConfigError: missing file, invalid YAML, not a mapping, or an unknown key.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of field names to values, got {type(data).__name__}")
    known = _field_names(_as_types(types))
    for key in data:
        if not isinstance(key, str) or key not in known:
            close = difflib.get_close_matches(str(key), known, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{path}: unknown config key {key!r}{hint} (known keys: {', '.join(sorted(known))})")
    return data


def _check_value(action: argparse.Action, value: Any, path: str) -> Any:
    """A YAML value converted and checked the way the parser would treat it on the command line."""
    key = action.dest
    conv = action.type
    if value is None:
        return None
    if action.nargs in ("+", "*"):
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_check_scalar(key, conv, action.choices, v, path) for v in value]
    if isinstance(value, (list, dict)) and conv is not None and conv not in (dict, list):
        raise ConfigError(f"{path}: key {key!r} must be a single value, got a {type(value).__name__}")
    return _check_scalar(key, conv, action.choices, value, path)


def _check_scalar(key: str, conv: Any, choices: Any, value: Any, path: str) -> Any:
    if conv is not None and not isinstance(value, (dict, list)):
        # an int in a float field is fine; a bool in a numeric field is not.  Strings are read the
        # way the command line reads them ("1e-4" is a string to YAML 1.1 but a float here).
        if isinstance(value, bool) and conv in (int, float):
            raise ConfigError(f"{path}: key {key!r} must be a number, got {value!r}")
        try:
            if conv is str and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)  # `name: 123` in YAML means the string, as on the command line
            elif isinstance(value, str) or conv in (int, float):
                new = conv(value)
                if conv is int and isinstance(value, float) and new != value:
                    raise ValueError("not an integer")
                value = new
            elif callable(conv) and getattr(conv, "__name__", "") == "string_to_bool":
                value = conv(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            name = getattr(conv, "__name__", str(conv))
            raise ConfigError(f"{path}: key {key!r}: cannot read {value!r} as {name} ({e})") from None
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}: key {key!r}: {value!r} is not one of {list(choices)}")
    return value


def parse_config(
    dataclass_types: DataclassTypes, argv: Optional[Sequence[str]] = None, *, description: Optional[str] = None
) -> tuple[Any, ...]:
    """Instances of ``dataclass_types`` from ``--config FILE.yaml`` files and ``--field value``
    overrides (see the module docstring for the order).

    Args:
        dataclass_types: one dataclass type or a sequence of them (field names must be distinct).
        argv: the command-line arguments (default ``sys.argv[1:]``).
        description: the ``--help`` text's description.

    Returns:
        One instance per type, in order (always a tuple).

    Raises:
        ConfigError: a config file that is missing, invalid, has an unknown key or a value of the
            wrong type; an unknown command-line argument.  A malformed command-line value exits
            with argparse's usage message, as any CLI does.
    """
    from transformers import HfArgumentParser

    types = _as_types(dataclass_types)
    parser = HfArgumentParser(types, description=description)
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE.yaml",
        help="YAML file of field values (repeatable; later files win; command-line flags win over files).",
    )
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", action="append", default=[])
    cfg, rest = pre.parse_known_args(argv)

    actions: dict[str, argparse.Action] = {}
    for a in parser._actions:  # the first action of a dest is ``--field`` (``--no_field`` comes later)
        if a.option_strings and a.dest not in ("help", "config"):
            actions.setdefault(a.dest, a)
    json_fields = _json_fields(types)
    for path in cfg.config:
        for key, value in load_yaml(path, types).items():
            action = actions[key]
            if key in json_fields and isinstance(value, dict):
                value = json.dumps(value)
            checked = _check_value(action, value, path)
            parser.set_defaults(**{key: checked})
            action.required = False  # a required field given in a file need not be on the CLI
    try:
        outputs = parser.parse_args_into_dataclasses(args=list(rest), look_for_args_file=False)
    except ValueError as e:
        raise ConfigError(f"command line: {e}") from None
    outputs = tuple(outputs[: len(types)])  # drop the extra namespace holding --config
    _normalise_json(outputs, json_fields)
    return outputs


def _plain(value: Any) -> Any:
    """A value as plain YAML data (enums by value, paths as strings, tuples as lists)."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    return value


def config_to_dict(instances: Any) -> dict[str, Any]:
    """The fields of one dataclass instance or a sequence of them, merged into one flat dict."""
    if dataclasses.is_dataclass(instances) and not isinstance(instances, type):
        instances = (instances,)
    out: dict[str, Any] = {}
    for inst in instances:
        json_fields = _json_fields([type(inst)])
        for f in dataclasses.fields(inst):
            if f.init:
                value = getattr(inst, f.name)
                if f.name in json_fields and isinstance(value, str):
                    value = json.loads(value)  # a mapping in the YAML file
                out[f.name] = _plain(value)
    return out


def save_config(instances: Any, path: str | os.PathLike) -> str:
    """Write the resolved config (one instance or a sequence of them) as flat YAML, atomically;
    returns the path.  ``parse_config(types, ["--config", path])`` reads it back to equal
    instances."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(instances), fh, sort_keys=False, allow_unicode=True)
    os.replace(tmp, path)
    return path
