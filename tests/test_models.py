"""models.py: the timm factory (sizes, pretrained from a local file) and the saved-model round trip."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest
import timm
import torch
from helpers import broken_model_copy

from oracle_mnist.config import ConfigError, parse_params
from oracle_mnist.errors import OracleMnistError
from oracle_mnist.models import (
    RECIPES,
    ModelMeta,
    Recipe,
    build_model,
    load_model,
    recipe_for,
    resolve_recipe,
    save_model,
)

META = ModelMeta(
    model_name="resnet18",
    class_names=("big", "sun", "moon", "cattle", "next", "field", "not", "arrow", "time", "wood"),
    image_size=28,
    mean=0.25,
    std=0.3,
    data_hash="d" * 64,
    params_hash="p" * 64,
    metrics={"val_acc": 0.9},
    epoch=3,
    temperature=1.7,
    recipe={"family": "dense", "image_size": 28, "epochs": 3, "lr": 0.002},
    precision="bfloat16",
)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100", "efficientnet_b0"])
def test_build_model_gives_one_channel_in_and_class_logits_out(name):
    model = build_model(name, num_classes=10, image_size=28).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10)


def test_build_model_names_the_image_size_a_model_needs():
    with pytest.raises(OracleMnistError, match=r"'convnext_atto' cannot take 28x28.*image_size: 32 or more"):
        build_model("convnext_atto", num_classes=10, image_size=28)
    assert build_model("convnext_atto", num_classes=10, image_size=32).training


def test_build_model_rejects_unknown_name():
    with pytest.raises(OracleMnistError, match="'resnet_nope' is not a timm model"):
        build_model("resnet_nope", num_classes=10, image_size=28)


def test_pretrained_from_local_file_is_adapted_to_one_channel_and_new_classes(tmp_path):
    # An ImageNet-shaped checkpoint (3 input channels, 1000 classes), as timm's own download would give.
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=1000, in_chans=3)
    weights = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), weights)

    model = build_model("resnet10t", 10, 28, pretrained=True, weights_file=str(weights))

    first = source.state_dict()["conv1.0.weight"]
    # timm adapts RGB to grey by summing the filters over the input channels.
    torch.testing.assert_close(model.state_dict()["conv1.0.weight"], first.sum(dim=1, keepdim=True))
    torch.testing.assert_close(
        model.state_dict()["layer4.0.conv2.weight"], source.state_dict()["layer4.0.conv2.weight"]
    )
    assert model.state_dict()["fc.weight"].shape == (10, 512)


def test_pretrained_with_missing_file_names_it(tmp_path):
    with pytest.raises(OracleMnistError, match=r"train.weights_file: .*absent.pth does not exist"):
        build_model("resnet10t", 10, 28, pretrained=True, weights_file=str(tmp_path / "absent.pth"))


def test_save_load_round_trip_keeps_weights_meta_and_outputs(tmp_path):
    model = build_model("resnet18", 10, 28).eval()
    path = tmp_path / "models" / "model.pt"
    save_model(path, model, META)

    loaded, meta = load_model(path)

    assert meta == META
    assert not loaded.training
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == 1
    assert raw["meta"]["class_names"] == META.class_names


def test_load_model_rejects_foreign_and_mismatched_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(OracleMnistError, match=r"junk\.pt: not a readable model file"):
        load_model(junk)

    wrong = tmp_path / "wrong.pt"
    save_model(wrong, build_model("resnet18", 10, 28), replace(META, model_name="resnet10t"))
    with pytest.raises(OracleMnistError, match=r"wrong\.pt: weights do not fit model 'resnet10t'"):
        load_model(wrong)

    with pytest.raises(OracleMnistError, match=r"absent\.pt: model file not found"):
        load_model(tmp_path / "absent.pt")


def test_saving_the_same_model_twice_gives_identical_files(tmp_path):
    model = build_model("resnet10t", 10, 28)
    save_model(tmp_path / "a.pt", model, META)
    save_model(tmp_path / "b.pt", model, META)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mean": float("nan")}, "mean: expected a finite number, got nan"),
        ({"std": float("inf")}, "std: expected a finite number, got inf"),
        ({"std": 0.0}, "std: must be positive, got 0.0"),
        ({"std": -0.1}, "std: must be positive"),
        ({"image_size": 0}, "image_size: expected a positive integer"),
        ({"class_names": ("one",)}, "class_names: expected at least 2"),
        ({"class_names": ("a", "a")}, "class_names: names repeat"),
        ({"model_name": ""}, "model_name: expected a model name"),
        ({"epoch": -1}, "epoch: expected a non-negative integer"),
        ({"temperature": 0.0}, r"temperature: expected a number from 0.05 to 20 .*, got 0.0"),
        ({"temperature": -2.0}, "temperature: expected a number from 0.05 to 20"),
        ({"temperature": float("nan")}, "temperature: expected a number from 0.05 to 20 .*, got nan"),
        ({"temperature": float("inf")}, "temperature: expected a number from 0.05 to 20 .*, got inf"),
        ({"temperature": True}, "temperature: expected a number from 0.05 to 20 .*, got True"),
        ({"temperature": "2"}, "temperature: expected a number from 0.05 to 20 .*, got '2'"),
        # Positive and finite, but logits / T overflow to infinity: every probability would be NaN.
        (
            {"temperature": 5e-324},
            r"temperature: expected a number from 0.05 to 20 \(the range training fits it in\), got 5e-324",
        ),
        ({"temperature": 1e300}, "temperature: expected a number from 0.05 to 20 .*, got 1e[+]300"),
        ({"precision": "fp8"}, "precision: expected one of float32, bfloat16, float16, got 'fp8'"),
        ({"recipe": {"network": ["patch_size"]}}, r"recipe.network: expected names of timm arguments"),
        ({"recipe": {"network": {"dims": [8, 16]}}}, r"recipe.network: .*got \{'dims': \[8, 16\]\}"),
    ],
)
def test_model_meta_refuses_unusable_values(changes, message):
    with pytest.raises(OracleMnistError, match=message):
        replace(META, **changes)


def test_model_meta_from_dict_names_the_source():
    raw = {**asdict(META), "class_names": list(META.class_names)}
    assert ModelMeta.from_dict(raw, "m.pt") == META
    with pytest.raises(OracleMnistError, match=r"^m\.pt: model metadata: std: must be positive, got 0$"):
        ModelMeta.from_dict({**raw, "std": 0}, "m.pt")
    with pytest.raises(OracleMnistError, match=r"^m\.pt: model metadata is missing or has unknown fields"):
        ModelMeta.from_dict({**raw, "extra": 1}, "m.pt")
    with pytest.raises(OracleMnistError, match=r"^m\.pt: model metadata class_names: expected a list"):
        ModelMeta.from_dict({**raw, "class_names": "abc"}, "m.pt")


@pytest.mark.parametrize(
    ("weight", "meta", "message"),
    [
        (float("nan"), {}, r"weights are not finite \(NaN or infinity\) in 1 tensor\(s\): conv1.weight"),
        (float("inf"), {}, r"weights are not finite"),
        (None, {"std": float("nan")}, r"model metadata: std: expected a finite number, got nan"),
        (None, {"mean": float("-inf")}, r"model metadata: mean: expected a finite number"),
        (None, {"std": 0.0}, r"model metadata: std: must be positive, got 0.0"),
        (None, {"temperature": -1.0}, r"model metadata: temperature: expected a number from 0.05 to 20"),
        (
            None,
            {"temperature": 5e-324},
            r"model metadata: temperature: expected a number from 0.05 to 20 .*5e-324",
        ),
    ],
)
def test_load_model_refuses_a_broken_model(tmp_path, model_file, weight, meta, message):
    broken = broken_model_copy(model_file, tmp_path / "broken.pt", weight, **meta)
    with pytest.raises(OracleMnistError, match=f"^{tmp_path / 'broken.pt'}: {message}"):
        load_model(broken)


def test_a_model_file_from_before_calibration_loads_with_temperature_1(tmp_path, model_file):
    payload = torch.load(model_file, weights_only=True)
    payload["meta"] = {**payload["meta"], "temperature": 2.5}
    with open(tmp_path / "t.pt", "wb") as fh:
        torch.save(payload, fh)
    assert load_model(tmp_path / "t.pt")[1].temperature == 2.5
    del payload["meta"]["temperature"]
    with open(tmp_path / "old.pt", "wb") as fh:
        torch.save(payload, fh)
    _, meta = load_model(tmp_path / "old.pt")
    assert meta.temperature == 1.0
    assert meta == replace(load_model(tmp_path / "t.pt")[1], temperature=1.0)


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("resnet10t", "dense"),
        ("resnet18", "dense"),
        ("resnext26ts", "dense"),  # grouped, not depthwise, convolutions
        ("mobilenetv3_small_100", "depthwise"),
        ("efficientnet_b0", "depthwise"),
        ("convnext_atto", "convnext"),  # depthwise without BatchNorm: by its class, timm's ConvNeXt
        ("convnextv2_atto", "convnext"),
        ("test_convnext", "convnext"),  # timm's small test ConvNeXt: no conv_mlp of its own
    ],
)
def test_recipe_follows_the_kind_of_convolutions(name, family):
    recipe = recipe_for(name)
    assert recipe == RECIPES[family]
    if recipe.network:  # timm's constructor of this model takes the recipe's network arguments
        assert build_model(name, 10, 32, network=recipe.network).stages[0].blocks[0].conv_dw.kernel_size == (
            3,
            3,
        )


def test_the_convnext_recipe_changes_the_network_and_the_model_file_rebuilds_it(tmp_path):
    recipe = RECIPES["convnext"]
    model = build_model("test_convnext", 10, 32, network=recipe.network).eval()
    plain = build_model("test_convnext", 10, 32)
    assert model.stages[0].blocks[0].conv_dw.kernel_size == (3, 3)
    assert plain.stages[0].blocks[0].conv_dw.kernel_size == (7, 7)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    meta = replace(META, model_name="test_convnext", image_size=32, recipe=asdict(recipe))
    save_model(tmp_path / "model.pt", model, meta)

    loaded, loaded_meta = load_model(tmp_path / "model.pt")

    assert loaded_meta.recipe["network"] == recipe.network
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # The same weights without the record of the network: timm's own ConvNeXt, which they do not fit.
    save_model(tmp_path / "bare.pt", model, replace(meta, recipe={}))
    with pytest.raises(OracleMnistError, match=r"bare\.pt: weights do not fit model 'test_convnext'"):
        load_model(tmp_path / "bare.pt")


def test_build_model_names_network_arguments_timm_refuses():
    with pytest.raises(OracleMnistError, match=r"'resnet10t': timm cannot build it with \{'patch_size': 2\}"):
        build_model("resnet10t", 10, 64, network={"patch_size": 2})


def test_the_network_is_recorded_in_the_recipe_and_dropped_for_pretrained_weights():
    auto = {"image_size": "auto"}, {"epochs": "auto", "lr": "auto"}
    params, recipe = resolve_recipe(_params("convnext_atto", *auto))
    assert recipe == RECIPES["convnext"] and recipe.network["kernel_sizes"] == 3
    assert str(recipe).endswith(
        ", mean of the last 30, kernel_sizes=3, norm_layer=batchnorm2d, ls_init_value=1.0, conv_mlp=True"
    )
    # Pretrained weights fit only timm's own network; the training settings still come from the recipe.
    params, recipe = resolve_recipe(_params("convnext_atto", auto[0], {**auto[1], "pretrained": True}))
    assert recipe.network == {} and params.train.lr == RECIPES["convnext"].lr


def test_a_model_no_recipe_suits_gets_an_error_saying_what_to_set():
    with pytest.raises(
        OracleMnistError, match=r"'edgenext_xx_small': no recipe.*without BatchNorm.*train.lr yourself"
    ):
        recipe_for("edgenext_xx_small")  # ConvNeXt-like, but the ConvNeXt recipe's network is not its own
    with pytest.raises(
        OracleMnistError, match=r"'vit_tiny_patch16_224' is not a convolutional.*train.epochs"
    ):
        recipe_for("vit_tiny_patch16_224")
    with pytest.raises(OracleMnistError, match="'resnet_nope' is not a timm model"):
        recipe_for("resnet_nope")
    # With size, epochs and lr given there is nothing to work out: any timm model trains, as family "custom",
    # with CutMix off unless set.
    given = {"image_size": 32}, {"epochs": 3, "lr": 0.001}
    assert resolve_recipe(_params("vit_tiny_patch16_224", *given))[1] == Recipe(
        "custom", 32, 3, 0.001, 0.0, 10, 0.1
    )
    given[1]["augment"] = {"cutmix": 0.25}
    assert resolve_recipe(_params("vit_tiny_patch16_224", *given))[1] == Recipe("custom", 32, 3, 0.001, 0.25)
    with pytest.raises(OracleMnistError, match="not a convolutional network"):
        resolve_recipe(_params("vit_tiny_patch16_224", {"image_size": 32}, {"epochs": 3}))


def _params(model: str, featurize: dict, train: dict):
    return parse_params({"model": model, "classes": ["a", "b"], "featurize": featurize, "train": train})


def test_resolve_recipe_fills_only_the_auto_values():
    auto = {"image_size": "auto"}, {"epochs": "auto", "lr": "auto"}
    params, recipe = resolve_recipe(_params("mobilenetv3_small_100", *auto))
    expected = RECIPES["depthwise"]
    assert (params.featurize.image_size, params.train.epochs, params.train.lr) == (
        expected.image_size, expected.epochs, expected.lr,
    )  # fmt: skip
    assert params.train.augment.cutmix == expected.cutmix == 0.0
    assert params.train.average_epochs == expected.average_epochs == 30
    assert params.train.label_smoothing == expected.label_smoothing == 0.1
    assert recipe == expected
    params, recipe = resolve_recipe(_params("resnet10t", *auto))
    assert params.train.augment.cutmix == recipe.cutmix == RECIPES["dense"].cutmix > 0
    assert params.train.average_epochs == recipe.average_epochs == RECIPES["dense"].average_epochs == 30
    # Dense networks train with softer targets than depthwise ones (docs/results.md).
    assert params.train.label_smoothing == recipe.label_smoothing == 0.2 > expected.label_smoothing
    assert (
        str(recipe)
        == "dense: 64 px, 80 epochs, lr 0.002, CutMix 0.5, label smoothing 0.2, mean of the last 30"
    )
    params, recipe = resolve_recipe(_params("resnet10t", auto[0], {**auto[1], "average_epochs": 0}))
    assert params.train.average_epochs == recipe.average_epochs == 0 and str(recipe).endswith(", best epoch")
    params, recipe = resolve_recipe(
        _params("mobilenetv3_small_100", {"image_size": 40}, {"epochs": 3, "lr": "auto"})
    )
    assert (params.featurize.image_size, params.train.epochs, params.train.lr) == (40, 3, expected.lr)
    assert (recipe.family, recipe.image_size, recipe.epochs) == ("depthwise", 40, 3)


def test_resolve_recipe_checks_the_rules_that_need_the_resolved_values():
    epochs = RECIPES["dense"].epochs
    with pytest.raises(
        ConfigError, match=rf"train.warmup_epochs: must be < epochs \({epochs}\), got {epochs}"
    ):
        resolve_recipe(_params("resnet10t", {}, {"warmup_epochs": epochs}))


def test_a_recipe_recorded_before_its_later_fields_reads_as_what_that_model_trained_with():
    # meta.recipe of an older model file: no CutMix, window or label smoothing recorded (stages/evaluate.py).
    old = Recipe(**{"family": "dense", "image_size": 64, "epochs": 30, "lr": 0.002})
    assert (old.cutmix, old.average_epochs, old.label_smoothing) == (0.0, 10, 0.1)
    assert str(old) == "dense: 64 px, 30 epochs, lr 0.002, label smoothing 0.1, mean of the last 10"
