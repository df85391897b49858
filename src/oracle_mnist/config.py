"""params.yaml -> frozen dataclasses: the one config source for stages, tests and serving."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from oracle_mnist.errors import OracleMnistError

OFFICIAL_SOURCE = (
    "https://github.com/wm-bupt/oracle-mnist/raw/b6cb263f84d39a8bbb94c5b806d846b600068924/data/oracle/"
)


class ConfigError(OracleMnistError, ValueError):
    """A params file that is missing a key, has an unknown key or a value of the wrong type."""


@dataclass(frozen=True)
class DataConfig:
    source: str = OFFICIAL_SOURCE
    format: Literal["idx", "scans"] = "idx"
    seed: int = 42
    val_fraction: float = 0.1


@dataclass(frozen=True)
class FeaturizeConfig:
    image_size: int = 28
    min_side: int = 16
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class Params:
    model: str
    classes: tuple[str, ...]
    data: DataConfig = field(default_factory=DataConfig)
    featurize: FeaturizeConfig = field(default_factory=FeaturizeConfig)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by dotted name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'params'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where or 'params'}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: missing")
            continue
        values[name] = _coerce(hints[name], raw[name], key)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def parse_params(raw: dict[str, Any]) -> Params:
    params = _build(Params, raw, "")
    if len(set(params.classes)) != len(params.classes) or len(params.classes) < 2:
        raise ConfigError(f"classes: need two or more distinct names, got {list(params.classes)}")
    if not 0.0 < params.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in (0, 1), got {params.data.val_fraction}")
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_params(raw if raw is not None else {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
