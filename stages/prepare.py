"""DVC stage prepare: fetch and verify the raw files, validate them, split train/val/test."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from oracle_mnist.config import load_params
from oracle_mnist.datasets import SPLITS, class_counts, save_features, save_manifest, split_idx, split_scans
from oracle_mnist.errors import stage_main
from oracle_mnist.fsutil import atomic_dir, write_json
from oracle_mnist.sources import (
    FetchedFile,
    Limits,
    blame_source,
    fetch_idx,
    fetch_scans,
    is_url,
    resolve_local,
)

PARAMS = Path("params.yaml")
RAW = Path("data/raw")
PREPARED = Path("data/prepared")
METRICS = Path("metrics/prepare.json")
# dvc.yaml makes prepare depend on this folder: DVC sees changes to a local source only inside it.
TRACKED_SOURCES = Path("data/sources")


@stage_main
def main() -> None:
    params = load_params(PARAMS)
    data = params.data
    # A relative local source is relative to params.yaml, whatever directory the stage runs from.
    base_dir = PARAMS.resolve().parent
    warn_if_untracked(data.source, base_dir)
    with (
        atomic_dir(RAW) as raw,
        atomic_dir(PREPARED) as prepared,
        blame_source(raw, data.source, base_dir),
    ):
        if data.format == "idx":
            limits = Limits(deadline=data.download_timeout, max_bytes=data.max_download_bytes)
            fetched = fetch_idx(data.source, raw, base_dir, limits)
            arrays = split_idx(raw, params.classes, data.val_fraction, data.seed)
            labels = {split: arrays[split][1] for split in SPLITS}
            for split in SPLITS:
                save_features(prepared / f"{split}.npz", *arrays[split])
            inputs = {
                f.name: {"sha256": f.sha256, "bytes": f.size, "verified_by": f.verified_by} for f in fetched
            }
        else:
            fetched = fetch_scans(data.source, raw, base_dir, data.max_pixels)
            manifests = split_scans(
                raw, params.classes, data.val_fraction, data.seed, data.min_side, data.max_pixels
            )
            labels = {split: [label for _, label in manifests[split]] for split in SPLITS}
            for split in SPLITS:
                save_manifest(prepared / f"{split}.json", manifests[split])
            inputs = tree_summary(fetched)
        write_json(
            METRICS,
            {
                "format": data.format,
                "source": data.source,
                "counts": {split: counts(labels[split], params.classes) for split in SPLITS},
                "inputs": inputs,
            },
        )


def warn_if_untracked(source: str, base_dir: Path) -> None:
    if is_url(source):
        return
    # resolve_local first: a bad source (a symlink loop above all, which resolve() raises on as a
    # RuntimeError) is an error naming it, not a traceback.
    if resolve_local(source, base_dir).resolve().is_relative_to((base_dir / TRACKED_SOURCES).resolve()):
        return
    print(
        f"warning: data.source: {source} lies outside {TRACKED_SOURCES}/, so DVC cannot see changes to it and "
        f"`dvc repro` will not rerun prepare when its files change; move or copy it under {TRACKED_SOURCES}/",
        file=sys.stderr,
    )


def counts(labels: Sequence[int] | np.ndarray, classes: tuple[str, ...]) -> dict[str, int]:
    per_class = class_counts(np.asarray(labels, dtype=np.int64), len(classes))
    return {"total": sum(per_class), **dict(zip(classes, per_class, strict=True))}


def tree_summary(fetched: list[FetchedFile]) -> dict[str, object]:
    """One digest for a whole scans tree (per-file sums would swamp the metrics file)."""
    digest = hashlib.sha256("".join(f"{f.sha256}  {f.name}\n" for f in fetched).encode())
    return {
        "files": len(fetched),
        "bytes": sum(f.size for f in fetched),
        "tree_sha256": digest.hexdigest(),
        "verified_by": sorted({f.verified_by for f in fetched}),
    }


if __name__ == "__main__":
    main()
