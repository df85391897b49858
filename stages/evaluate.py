"""DVC stage evaluate: models/model.pt on the test split -> metrics/evaluate.json and the evaluation plots."""

from __future__ import annotations

from pathlib import Path

from oracle_mnist import engine, figures, metrics
from oracle_mnist.config import load_params
from oracle_mnist.datasets import load_features
from oracle_mnist.errors import OracleMnistError, stage_main
from oracle_mnist.fsutil import atomic_path, write_json
from oracle_mnist.images import to_tensor
from oracle_mnist.models import Recipe, load_model

PARAMS = Path("params.yaml")
MODEL = Path("models/model.pt")
TEST = Path("data/features/test.npz")
METRICS = Path("metrics/evaluate.json")
RECIPE = Path("metrics/recipe.json")
PER_CLASS_SCORES = Path("metrics/per_class.json")
CONFUSION = Path("plots/confusion.json")
PER_CLASS = Path("plots/per_class_accuracy.json")
MISCLASSIFIED = Path("plots/misclassified.png")
# The reliability diagram's two series, one file each (one DVC plot draws both).
RELIABILITY = {
    "uncalibrated": Path("plots/reliability_uncalibrated.json"),
    "calibrated": Path("plots/reliability_calibrated.json"),
}


@stage_main
def main() -> None:
    cfg = load_params(PARAMS).evaluate
    device = engine.select_device(cfg.device)
    model, meta = load_model(MODEL, device)
    images, labels = load_features(TEST, len(meta.class_names))
    if images.shape[1] != meta.image_size:
        raise OracleMnistError(
            f"{TEST}: images are {images.shape[1]} px but {MODEL} expects {meta.image_size} px"
        )

    logits = engine.predict_logits(
        model, to_tensor(images, meta.mean, meta.std), device, cfg.batch_size
    ).numpy()
    report = metrics.evaluate(logits, labels, meta.class_names, cfg.ece_bins, meta.temperature)
    # The probabilities served (calibrated by the model's temperature) and, for comparison, the plain softmax.
    probs = metrics.softmax(logits, meta.temperature)
    preds = probs.argmax(axis=1)
    series = {"uncalibrated": metrics.softmax(logits), "calibrated": probs}

    # Per-class scores go to their own file: in the metrics file each would be a `dvc exp show` column.
    write_json(PER_CLASS_SCORES, report.pop("per_class"))
    # Beside the scores, the numbers in force that produced them (auto resolved): the experiment table's
    # columns. The whole recipe, and the precision it trained in (which makes the same params give other scores
    # on another machine), are words, too wide for a column: their own file.
    recipe = Recipe(**meta.recipe) if meta.recipe else None
    in_force = {"image_size": meta.image_size}
    if recipe:
        in_force.update(epochs=recipe.epochs, lr=recipe.lr)
    write_json(METRICS, {**report, **in_force})
    write_json(
        RECIPE,
        {"recipe": str(recipe) if recipe else "not recorded", "precision": meta.precision or "not recorded"},
    )
    write_json(CONFUSION, metrics.confusion_records(labels, preds, meta.class_names))
    write_json(PER_CLASS, metrics.per_class_accuracy(labels, preds, meta.class_names))
    for name, path in RELIABILITY.items():
        write_json(path, metrics.reliability_rows(series[name], labels, cfg.ece_bins, name))
    grid = figures.misclassified_grid(
        images, labels, preds, probs.max(axis=1), meta.class_names, max_images=cfg.max_misclassified
    )
    with atomic_path(MISCLASSIFIED) as tmp:
        grid.save(tmp, format="PNG")
    print(
        f"{TEST}: test accuracy {report['accuracy']:.2%}, macro-F1 {report['macro_f1']:.3f}, "
        f"ECE {report['ece']:.3f} ({report['ece_uncalibrated']:.3f} before calibration) on {len(labels)} images"
    )


if __name__ == "__main__":
    main()
