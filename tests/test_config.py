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


def test_every_setting_is_in_params_or_the_docs_settings_table():
    """params.yaml holds the main knobs only; every other key must be documented with its default."""
    import dataclasses
    import typing

    from oracle_mnist import config

    def keys(cls: type, prefix: str = "") -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            out += keys(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint) else [prefix + f.name]
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
