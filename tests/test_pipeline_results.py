"""The committed results as a user first reads them, on a copy of the repository with nothing run: the
experiment table and the metrics diff fit a terminal and show the numbers in force, not "auto"."""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
from pathlib import Path

import pytest
from helpers import REPO, dvc, git, make_repo_copy

pytestmark = pytest.mark.slow  # runs dvc

# What a reader compares across experiments: the scores, and the model and recipe numbers behind them.
COMPARED = ("accuracy", "macro_f1", "ece", "model", "image_size", "epochs", "lr")


@pytest.fixture
def committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COLUMNS", "120")  # the terminal width dvc's tables are drawn for
    return make_repo_copy(tmp_path / "repo", None)


def readme_command(name: str) -> list[str]:
    """The README's own `dvc NAME ...` line in its Workflows section, comment stripped."""
    lines = re.findall(rf"^dvc {name}\b.*$", (REPO / "README.md").read_text(encoding="utf-8"), re.MULTILINE)
    assert lines, f"README.md shows no `dvc {name}` command"
    return shlex.split(lines[0], comments=True)[1:]


def test_experiment_table_has_25_columns_or_fewer_with_the_numbers_in_force(committed: Path):
    rows = list(csv.DictReader(io.StringIO(dvc(committed, "exp", "show", "--csv").stdout)))
    assert len(rows[0]) <= 25, sorted(rows[0])
    for row in rows:
        for name in ("accuracy", "macro_f1", "ece", "image_size", "epochs", "lr"):
            float(row[name])  # a number: "auto" or a missing value fails here
        assert row["model"] == "resnet10t"


def test_the_readmes_experiment_table_fits_120_columns(committed: Path):
    table = dvc(committed, *readme_command("exp show"), "--no-pager").stdout
    assert max(map(len, table.splitlines())) <= 120, table
    header = next(line for line in table.splitlines() if "Experiment" in line)
    assert set(COMPARED) <= set(header.split()), header  # whole names: none squeezed to "…"


def test_metrics_diff_fits_120_columns(committed: Path):
    path = committed / "metrics/evaluate.json"
    scores = json.loads(path.read_text(encoding="utf-8"))
    scores["accuracy"] -= 0.01
    path.write_text(json.dumps(scores), encoding="utf-8")
    git(committed, "commit", "-qam", "a worse model")
    diff = dvc(committed, "metrics", "diff", "--all", "HEAD~1").stdout
    assert "accuracy" in diff and "lr" in diff
    assert max(map(len, diff.splitlines())) <= 120, diff
