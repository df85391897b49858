from pathlib import Path

import pytest
import yaml
from helpers import REPO

from oracle_mnist.config import ConfigError, load_params, parse_params


def _raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def test_repository_params_load_into_typed_config():
    params = load_params(REPO / "params.yaml")
    assert params.num_classes == len(params.classes) == 10
    assert params.classes[0] == "big" and params.classes[9] == "wood"
    assert isinstance(params.data.val_fraction, float)
    # The recipe's keys are not in the file (each would be an "auto" column in `dvc exp show`): auto by default.
    assert (params.featurize.image_size, params.train.epochs, params.train.lr) == ("auto", "auto", "auto")


def test_recipe_keys_take_a_number_or_auto():
    """auto (the committed value) is left for models.resolve_recipe; anything else must be a number."""
    raw = _raw()
    raw["featurize"]["image_size"], raw["train"]["epochs"], raw["train"]["lr"] = "auto", 40, 0.004
    params = parse_params(raw)
    assert (params.featurize.image_size, params.train.epochs, params.train.lr) == ("auto", 40, 0.004)
    for key, value, message in [
        ("epochs", "Auto", r"^train.epochs: expected int or 'auto', got 'Auto'$"),
        ("epochs", 0, r"^train.epochs: must be >= 1 or 'auto', got 0$"),
        ("lr", -1.0, r"^train.lr: must be > 0.0 or 'auto', got -1.0$"),
    ]:
        raw = _raw()
        raw["train"][key] = value
        with pytest.raises(ConfigError, match=message):
            parse_params(raw)
    raw = _raw()
    raw["train"]["augment"] = {"cutmix": 1.5}
    with pytest.raises(ConfigError, match=r"^train.augment.cutmix: must be <= 1.0 or 'auto', got 1.5$"):
        parse_params(raw)
    assert parse_params(_raw()).train.augment.cutmix == "auto"


def test_unknown_key_is_named():
    raw = _raw()
    raw["data"]["sorce"] = "x"
    with pytest.raises(ConfigError, match=r"data: unknown key\(s\) \['sorce'\]"):
        parse_params(raw)


def test_wrong_type_is_named():
    raw = _raw()
    raw["featurize"]["image_size"] = "big"
    with pytest.raises(ConfigError, match=r"featurize.image_size: expected int or 'auto', got 'big'"):
        parse_params(raw)


def test_literal_choice_is_checked():
    raw = _raw()
    raw["data"]["format"] = "png"
    with pytest.raises(ConfigError, match=r"^data.format: expected 'idx' or 'scans', got 'png'$"):
        parse_params(raw)


def test_missing_required_key_is_named():
    raw = _raw()
    del raw["model"]
    with pytest.raises(ConfigError, match=r"^model: missing"):
        parse_params(raw)


def test_types_are_strict_but_an_int_is_a_float():
    """YAML's "3" or true never becomes a number; `rotate: 10` is 10.0, as the params hash saw it before."""
    for key, value, message in [
        ("epochs", "3", r"^train.epochs: expected int or 'auto', got '3'$"),
        ("epochs", True, r"^train.epochs: expected int or 'auto', got True$"),
        ("lr", "0.1", r"^train.lr: expected float or 'auto', got '0.1'$"),
        ("amp", 1, r"^train.amp: expected bool, got 1$"),
    ]:
        raw = _raw()
        raw["train"][key] = value
        with pytest.raises(ConfigError, match=message):
            parse_params(raw)
    raw = _raw()
    raw["train"]["augment"] = {"rotate": 10}
    rotate = parse_params(raw).train.model_dump()["augment"]["rotate"]
    assert type(rotate) is float and rotate == 10.0


def test_nested_unknown_keys_list_the_known_ones_and_errors_are_joined():
    raw = _raw()
    raw["train"]["epoch"] = 3
    raw["train"]["augment"] = {"rotat": 5, "scale": 1.5}
    raw["classes"] = ["a", 3]
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    message = str(caught.value)
    assert message.startswith("train") and "\n" not in message
    assert (
        "train: unknown key(s) ['epoch']; known: ['amp', 'augment', 'average_epochs', 'batch_size',"
        in message
    )
    assert (
        "train.augment: unknown key(s) ['rotat']; known: ['cutmix', 'elastic', 'erase_max_area', 'erase_prob',"
        in message
    )
    assert "; classes[1]: expected str, got 3" in message
    assert "; train.augment.scale: must be < 1.0, got 1.5" in message


@pytest.mark.parametrize(
    ("section", "changes", "message"),
    [
        ("data", {"val_fraction": 1.5}, r"^data.val_fraction: must be < 1.0, got 1.5$"),
        ("data", {"download_timeout": 0}, r"^data.download_timeout: must be > 0.0, got 0$"),
        (
            "train",
            {"epochs": 30, "warmup_epochs": 30},
            r"^train.warmup_epochs: must be < epochs \(30\), got 30$",
        ),
        ("train", {"lr": 0.002, "min_lr": 0.1}, r"^train.min_lr: must be <= lr \(0.002\), got 0.1$"),
        ("train", {"batches_per_epoch": 0}, r"^train.batches_per_epoch: must be >= 1, got 0$"),
        ("train", {"seed": -1}, r"^train.seed: must be >= 0, got -1$"),
        ("train", {"label_smoothing": 1}, r"^train.label_smoothing: must be < 1.0 or 'auto', got 1$"),
        ("evaluate", {"ece_bins": 0}, r"^evaluate.ece_bins: must be >= 1, got 0$"),
    ],
)
def test_value_rules_name_the_key(section: str, changes: dict, message: str):
    raw = _raw()
    raw[section] = {**(raw.get(section) or {}), **changes}
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_a_section_that_is_not_a_mapping_is_named():
    raw = _raw()
    raw["data"] = ["idx"]
    with pytest.raises(ConfigError, match=r"^data: expected a mapping, got list$"):
        parse_params(raw)
    with pytest.raises(ConfigError, match=r"^params: expected a mapping, got list$"):
        parse_params([1])


def test_params_are_frozen_and_hashable():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(ValueError, match="frozen"):
        params.train.epochs = 1  # type: ignore[misc]
    assert isinstance(params.classes, tuple) and hash(params) == hash(load_params(REPO / "params.yaml"))


def test_duplicate_classes_rejected():
    raw = _raw()
    raw["classes"] = ["a", "a"]
    with pytest.raises(ConfigError, match="distinct"):
        parse_params(raw)


def test_load_params_names_the_file(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_params(path)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_every_setting_is_in_params_or_the_docs_settings_table():
    """params.yaml holds the main knobs only; every other key must be documented with its default."""
    from pydantic import BaseModel

    from oracle_mnist import config

    def keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, f in cls.model_fields.items():
            nested = isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
            out += keys(f.annotation, f"{prefix}{name}.") if nested else [prefix + name]
        return out

    docs = (REPO / "docs/pipeline.md").read_text(encoding="utf-8")
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))

    def in_params(key: str) -> bool:
        node = params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = [k for k in keys(config.Params) if not in_params(k) and f"| `{k}` |" not in docs]
    assert not missing, f"settings neither in params.yaml nor in docs/pipeline.md's table: {missing}"
