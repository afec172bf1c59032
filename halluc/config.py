"""Recipe settings: dataclasses filled from a YAML file, then `section.key=value` overrides.

    python recipes/masked_sft.py --config recipes/configs/masked_sft.yaml sft.steps=200 errors.source=random
Unknown keys and badly typed values fail with the key (and the file) named.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import yaml


def load_config(cls, argv: list[str] | None = None, default_file: str | None = None):
    """Build `cls` from `--config FILE` (or `default_file`) and `key=value` / `--key value` args."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = default_file
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(describe(cls()))
            raise SystemExit(0)
        if arg == "--config":
            path, i = argv[i + 1], i + 2
            continue
        if "=" in arg:
            key, value = arg.lstrip("-").split("=", 1)
            i += 1
        elif arg.startswith("--") and i + 1 < len(argv):
            key, value, i = arg[2:], argv[i + 1], i + 2
        else:
            raise SystemExit(f"cannot read argument {arg!r}: use key=value or --key value")
        overrides.append((key.replace("-", "_"), value))
    cfg = cls()
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        _apply_mapping(cfg, data, where=path)
    for key, value in overrides:
        _set(cfg, key, yaml.safe_load(value), where="command line")
    return cfg


def _apply_mapping(cfg, data: dict, where: str, prefix: str = "") -> None:
    node = cfg
    for p in filter(None, prefix.split(".")):
        node = getattr(node, p)
    for key, value in data.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(node, key, None)):
            _apply_mapping(cfg, value, where, prefix + key + ".")
        else:
            _set(cfg, prefix + key, value, where)


def _set(cfg, dotted: str, value, where: str) -> None:
    *parents, name = dotted.split(".")
    target = cfg
    for p in parents:
        target = getattr(target, p, None)
        if not dataclasses.is_dataclass(target):
            raise SystemExit(f"{where}: unknown setting {dotted!r}\n{describe(cfg)}")
    fields = {f.name: f for f in dataclasses.fields(target)}
    if name not in fields:
        raise SystemExit(f"{where}: unknown setting {dotted!r}; valid here: {sorted(fields)}")
    hint = typing.get_type_hints(type(target))[name]
    try:
        setattr(target, name, _coerce(value, hint))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"{where}: {dotted}={value!r} is not a {hint}: {e}") from None


def _coerce(value, hint):
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except (TypeError, ValueError):
                pass
        raise ValueError("no member of the union fits")
    if origin in (tuple, list):
        return origin(_coerce(v, args[0]) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("expected true or false")
    if hint in (int, float, str):
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("expected an integer")
        return hint(value)
    return value


def describe(cfg, prefix: str = "") -> str:
    lines = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            lines.append(describe(v, prefix + f.name + "."))
        else:
            lines.append(f"  {prefix}{f.name} = {v!r}")
    return "\n".join(lines)


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
