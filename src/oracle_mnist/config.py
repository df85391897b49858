"""params.yaml -> frozen pydantic models: the one config source for stages, tests and serving."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails

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


class _Config(BaseModel):
    # strict: "3" is not 3 and true is not 1 (strict mode still takes an int where a float is due, as YAML
    # writes `rotate: 10`); forbid: a misspelt key fails instead of silently leaving the default in force.
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


Positive = Annotated[int, Field(ge=1)]
Device = Literal["auto", "cpu", "cuda", "mps"]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
# "auto": the model's architecture decides (oracle_mnist.models.recipe_for); stages resolve it before use.
Auto = Literal["auto"]


class DataConfig(_Config):
    source: str = OFFICIAL_SOURCE
    format: Literal["idx", "scans"] = "idx"
    seed: int = 42
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    # Scans only: the smallest accepted width/height, and the most pixels (read from the header before any
    # pixel is decompressed: decompression bombs are refused). These decide which raw files are accepted, so
    # they are data settings: changing featurize.image_size does not rerun prepare.
    min_side: int = 16
    max_pixels: int = 40_000_000
    # Seconds for one whole file, retries included: a server that trickles bytes cannot hold prepare for ever.
    download_timeout: Annotated[float, Field(gt=0)] = 600.0
    # Per file, checked as it streams: the largest official file is ~21 MB even uncompressed.
    max_download_bytes: Positive = 100_000_000


class FeaturizeConfig(_Config):
    # The side of the square the conversion writes (idx images, 28 px, are upscaled); auto: per architecture.
    image_size: Positive | Auto = "auto"


class AugmentConfig(_Config):
    """Per-batch training augmentation suited to glyphs: small affine moves and occlusion, never flips."""

    rotate: NonNegative = 10.0  # degrees, uniform in [-rotate, rotate]
    translate: NonNegative = 0.1  # fraction of the image side
    scale: Annotated[float, Field(ge=0, lt=1)] = 0.1  # zoom uniform in [1 - scale, 1 + scale]
    shear: NonNegative = 5.0  # degrees
    # Elastic bending: the largest move of its control points (engine.ELASTIC_POINTS a side), as a fraction of
    # the image side.
    elastic: NonNegative = 0.05
    erase_prob: Fraction = 0.25  # probability of one background-filled rectangle per image
    erase_max_area: Fraction = 0.15  # its largest area, as a fraction of the image
    # CutMix: the probability that an image gets a square of another image of its batch pasted in (area
    # uniform in [0, 1]), its label then shared with the partner's by area; auto: per architecture.
    cutmix: Fraction | Auto = "auto"


class TrainConfig(_Config):
    epochs: Positive | Auto = "auto"  # auto: per architecture (models.recipe_for)
    batch_size: Positive = 64  # global: split across processes under torchrun
    # AdamW's peak learning rate, reached after the warm-up; auto: per architecture.
    lr: Annotated[float, Field(gt=0)] | Auto = "auto"
    min_lr: NonNegative = 0.00001  # end of the cosine decay
    warmup_epochs: Annotated[int, Field(ge=0)] = 2
    weight_decay: NonNegative = 0.05
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] | Auto = "auto"  # auto: per architecture
    # The kept weights: the mean of the last N epochs' weights (all epochs in a shorter run), with BatchNorm
    # statistics recomputed for them; 0 keeps the epoch with the best validation accuracy instead; auto: per
    # architecture.
    average_epochs: Annotated[int, Field(ge=0)] | Auto = "auto"
    seed: Annotated[int, Field(ge=0)] = 0
    device: Device = "auto"  # auto: cuda, then mps, then cpu
    # Mixed precision where it is faster (engine.amp_dtype): float16 on CUDA; bfloat16 on CPUs with AVX512-BF16
    # or AMX for networks without depthwise convolutions; float32 elsewhere. Off: float32 everywhere.
    amp: bool = True
    pretrained: bool = False
    weights_file: str | None = None  # local pretrained weights (offline); None: timm's download
    batches_per_epoch: Positive | None = None  # None: the whole training split each epoch
    threads: Positive = 2  # torch CPU threads for training: fixed, so results do not depend on the core count
    augment: AugmentConfig = AugmentConfig()

    # Field validators see the fields declared above them (info.data), so these errors name the later field.
    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_within_run(cls, value: int, info: ValidationInfo) -> int:
        if isinstance(info.data.get("epochs"), int) and value >= info.data["epochs"]:
            raise ValueError(f"must be < epochs ({info.data['epochs']}), got {value}")
        return value

    @field_validator("min_lr")
    @classmethod
    def _min_lr_within_lr(cls, value: float, info: ValidationInfo) -> float:
        if isinstance(info.data.get("lr"), float | int) and value > info.data["lr"]:
            raise ValueError(f"must be <= lr ({info.data['lr']}), got {value}")
        return value


class EvaluateConfig(_Config):
    batch_size: Positive = 256
    ece_bins: Positive = 15  # equal-width confidence bins for the expected calibration error
    max_misclassified: Positive = 36  # images in plots/misclassified.png
    device: Device = "auto"


def _tuple_of_list(value: Any) -> Any:
    """YAML has lists, strict mode takes only tuples: the one conversion allowed (a tuple keeps Params hashable)."""
    return tuple(value) if isinstance(value, list) else value


class Params(_Config):
    model: str
    classes: Annotated[tuple[str, ...], BeforeValidator(_tuple_of_list)]
    data: DataConfig = DataConfig()
    featurize: FeaturizeConfig = FeaturizeConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value) or len(value) < 2:
            raise ValueError(f"need two or more distinct names, got {list(value)}")
        return value

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_TYPE_NAMES = {
    "int_type": "int",
    "float_type": "float",
    "string_type": "str",
    "bool_type": "bool",
    "tuple_type": "a list",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _dotted(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "params"


def _problem(error: ErrorDetails) -> str:
    """Pydantic's error in the loader's own words: what was expected and the value that was given."""
    kind, value, ctx = error["type"], error["input"], error.get("ctx", {})
    if kind == "missing":
        return "missing"
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind]} {next(iter(ctx.values()))}, got {value!r}"
    if kind == "literal_error":
        return f"expected {ctx['expected']}, got {value!r}"
    if kind == "model_type":
        return f"expected a mapping, got {type(value).__name__}"
    if kind == "value_error":
        return str(ctx["error"])
    if kind in _TYPE_NAMES:
        return f"expected {_TYPE_NAMES[kind]}, got {value!r}"
    return error["msg"]


def _unknown(loc: tuple[int | str, ...], keys: list[str]) -> str:
    model: Any = Params
    for part in loc:  # unknown keys only arise in mappings, and every mapping here is a model field
        model = model.model_fields[part].annotation
    return f"{_dotted(loc)}: unknown key(s) {sorted(keys)}; known: {sorted(model.model_fields)}"


def _is_union_tag(part: int | str) -> bool:
    """A loc part naming a union member (`constrained-int`, `literal['auto']`), not a key."""
    return isinstance(part, str) and ("-" in part or "[" in part or part in ("int", "float"))


def _message(exc: ValidationError) -> str:
    """One line: `<dotted.key>: <problem>` per error, unknown keys first (a typo explains a `missing`)."""
    unknown: dict[tuple[int | str, ...], list[str]] = {}
    problems: dict[str, list[ErrorDetails]] = {}
    for error in exc.errors():
        if error["type"] == "extra_forbidden":
            unknown.setdefault(error["loc"][:-1], []).append(str(error["loc"][-1]))
        else:
            key = _dotted(tuple(part for part in error["loc"] if not _is_union_tag(part)))
            problems.setdefault(key, []).append(error)
    lines = [_unknown(loc, keys) for loc, keys in unknown.items()]
    for key, errors in problems.items():
        # A `number | "auto"` field fails once per member: report the number's problem, naming the other choice.
        number = [e for e in errors if e["type"] != "literal_error" or len(errors) == 1]
        for error in number:
            problem = _problem(error)
            if len(number) < len(errors):
                problem = problem.replace(", got", " or 'auto', got", 1)
            lines.append(f"{key}: {problem}")
    return "; ".join(lines)


def parse_params(raw: Any) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_message(exc)) from None


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
