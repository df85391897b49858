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
    assert params.featurize.image_size == _raw()["featurize"]["image_size"]


def test_unknown_key_is_named():
    raw = _raw()
    raw["data"]["sorce"] = "x"
    with pytest.raises(ConfigError, match=r"data: unknown key\(s\) \['sorce'\]"):
        parse_params(raw)


def test_wrong_type_is_named():
    raw = _raw()
    raw["featurize"]["image_size"] = "big"
    with pytest.raises(ConfigError, match=r"featurize.image_size: expected int, got 'big'"):
        parse_params(raw)


def test_literal_choice_is_checked():
    raw = _raw()
    raw["data"]["format"] = "png"
    with pytest.raises(ConfigError, match=r"data.format: 'png' is not one of \['idx', 'scans'\]"):
        parse_params(raw)


def test_missing_required_key_is_named():
    raw = _raw()
    del raw["model"]
    with pytest.raises(ConfigError, match=r"^model: missing"):
        parse_params(raw)


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
