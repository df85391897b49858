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


# The character each of the dataset paper's class names (params.yaml `classes`) stands for: people reading a
# prediction know the glyph, not our English gloss. The one copy; the API's /model hands it to the page.
CLASS_CHARACTERS = {
    "big": "大",
    "sun": "日",
    "moon": "月",
    "cattle": "牛",
    "next": "翌",
    "field": "田",
    "not": "勿",
    "arrow": "矢",
    "time": "巳",
    "wood": "木",
}


def characters_of(class_names: tuple[str, ...] | list[str]) -> list[str | None]:
    """Each class's character; None for a name that is not one of the paper's (a model with other classes)."""
    return [CLASS_CHARACTERS.get(name) for name in class_names]


class ConfigError(OracleMnistError, ValueError):
    """A params file that is missing a key, has an unknown key or a value of the wrong type."""


@dataclass(frozen=True)
class DataConfig:
    source: str = OFFICIAL_SOURCE
    format: Literal["idx", "scans"] = "idx"
    seed: int = 42
    val_fraction: float = 0.1
    # Scans only: the smallest accepted width/height, and the most pixels (read from the header before any
    # pixel is decompressed: decompression bombs are refused). These decide which raw files are accepted, so
    # they are data settings: changing featurize.image_size does not rerun prepare.
    min_side: int = 16
    max_pixels: int = 40_000_000
    # Seconds for one whole file, retries included: a server that trickles bytes cannot hold prepare for ever.
    download_timeout: float = 600.0
    # Per file, checked as it streams: the largest official file is ~21 MB even uncompressed.
    max_download_bytes: int = 100_000_000

    def __post_init__(self) -> None:
        if self.download_timeout <= 0 or self.max_download_bytes <= 0:
            raise ConfigError("data.download_timeout and data.max_download_bytes: must be positive")


@dataclass(frozen=True)
class FeaturizeConfig:
    image_size: int = 64  # the side of the square the conversion writes; idx images (28 px) are upscaled


@dataclass(frozen=True)
class AugmentConfig:
    """Per-batch training augmentation suited to glyphs: small affine moves and occlusion, never flips."""

    rotate: float = 10.0  # degrees, uniform in [-rotate, rotate]
    translate: float = 0.1  # fraction of the image side
    scale: float = 0.1  # zoom uniform in [1 - scale, 1 + scale]
    shear: float = 5.0  # degrees
    erase_prob: float = 0.25  # probability of one background-filled rectangle per image
    erase_max_area: float = 0.15  # its largest area, as a fraction of the image

    def __post_init__(self) -> None:
        for name in ("rotate", "translate", "scale", "shear", "erase_prob", "erase_max_area"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.augment.{name}: must be >= 0, got {getattr(self, name)}")
        if self.scale >= 1 or self.erase_prob > 1 or self.erase_max_area > 1:
            raise ConfigError("train.augment: scale must be < 1, erase_prob and erase_max_area <= 1")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64  # global: split across processes under torchrun
    lr: float = 0.002  # AdamW peak learning rate, reached after the warm-up
    min_lr: float = 0.00001  # end of the cosine decay
    warmup_epochs: int = 2
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    seed: int = 0
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"  # auto: cuda, then mps, then cpu
    amp: bool = True  # mixed precision, used on CUDA only
    pretrained: bool = False
    weights_file: str | None = None  # local pretrained weights (offline); None: timm's download
    batches_per_epoch: int | None = None  # None: the whole training split each epoch
    threads: int = 2  # torch CPU threads for training: fixed, so results do not depend on the core count
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "seed", "threads"):
            if getattr(self, name) < (0 if name == "seed" else 1):
                raise ConfigError(f"train.{name}: must be positive, got {getattr(self, name)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"train.warmup_epochs: must be in [0, epochs), got {self.warmup_epochs}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(
                f"train.lr/min_lr: need 0 <= min_lr <= lr and lr > 0, got {self.lr}/{self.min_lr}"
            )
        if not 0 <= self.label_smoothing < 1 or self.weight_decay < 0:
            raise ConfigError("train.label_smoothing must be in [0, 1) and train.weight_decay >= 0")
        if self.batches_per_epoch is not None and self.batches_per_epoch < 1:
            raise ConfigError(
                f"train.batches_per_epoch: must be positive or null, got {self.batches_per_epoch}"
            )


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 256
    ece_bins: int = 15  # equal-width confidence bins for the expected calibration error
    max_misclassified: int = 36  # images in plots/misclassified.png
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"

    def __post_init__(self) -> None:
        for name in ("batch_size", "ece_bins", "max_misclassified"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluate.{name}: must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class Params:
    model: str
    classes: tuple[str, ...]
    data: DataConfig = field(default_factory=DataConfig)
    featurize: FeaturizeConfig = field(default_factory=FeaturizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

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
