"""The local report: two commits of a tiny DVC repository whose stage writes metrics, a confusion matrix, a
curve and an image, as the real evaluate stage does; the report must show both revisions, rendered offline."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import dvc, git
from PIL import Image

from oracle_mnist.errors import OracleMnistError
from oracle_mnist.report import faceted_by_revision, only_revision, slug, write_report

STAGE = """\
import json, os, random, yaml
from PIL import Image
quality = yaml.safe_load(open("params.yaml"))["quality"]
classes = ["big", "sun", "moon"]
rng = random.Random(0)
rows = []
for i in range(60):
    actual = classes[i % 3]
    predicted = actual if rng.random() < quality else classes[(i + 1) % 3]
    rows.append({"actual": actual, "predicted": predicted})
os.makedirs("metrics", exist_ok=True)
os.makedirs("plots", exist_ok=True)
accuracy = sum(r["actual"] == r["predicted"] for r in rows) / len(rows)
json.dump({"accuracy": accuracy}, open("metrics/test.json", "w"))
json.dump(rows, open("plots/confusion.json", "w"))
json.dump([{"step": s, "loss": 1 / (s + 1) / quality} for s in range(5)], open("plots/loss.json", "w"))
Image.new("L", (12, 12), int(255 * quality)).save("plots/samples.png")
"""

DVC_YAML = """\
stages:
  evaluate:
    cmd: python make.py
    deps: [make.py]
    params: [quality]
    outs: [plots/confusion.json, plots/loss.json, plots/samples.png]
    metrics: [metrics/test.json]
plots:
  - plots/confusion.json:
      template: confusion
      x: predicted
      y: actual
  - plots/loss.json:
      x: step
      y: loss
  - plots/samples.png
"""


def commit_run(repo: Path, quality: float, message: str) -> str:
    (repo / "params.yaml").write_text(f"quality: {quality}\n", encoding="utf-8")
    dvc(repo, "repro", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "--short", "HEAD").stdout.strip()


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A DVC repo whose outputs live in the DVC cache (not git), at a worse and a better commit."""
    repo = tmp_path_factory.mktemp("report") / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "test@example.com")
    git(repo, "config", "user.name", "test")
    dvc(repo, "init", "-q")
    (repo / "make.py").write_text(STAGE, encoding="utf-8")
    (repo / "dvc.yaml").write_text(DVC_YAML, encoding="utf-8")
    base = commit_run(repo, 0.5, "base")
    head = commit_run(repo, 0.9, "head")
    return repo, base, head


def png_links(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as img:
        img.verify()


@pytest.mark.slow
def test_report_shows_both_revisions(two_commits: tuple[Path, str, str], tmp_path: Path) -> None:
    repo, base, head = two_commits
    out = tmp_path / "report"
    md_path = write_report(repo, base, head, out)
    md = md_path.read_text(encoding="utf-8")

    assert md.startswith(f"# Results: `{base}` vs `{head}`")
    metrics_row = next(line for line in md.splitlines() if "| accuracy" in line)
    path, _, before, after, change = (cell.strip() for cell in metrics_row.strip("|").split("|"))
    assert path == "metrics/test.json"
    assert float(after) > float(before) and float(change) > 0
    params_row = next(line for line in md.splitlines() if "quality" in line)
    assert "0.5" in params_row and "0.9" in params_row

    links = png_links(md)
    confusion = [link for link in links if link.startswith("images/plots_confusion.json@")]
    assert sorted(confusion) == sorted(f"images/plots_confusion.json@{rev}.png" for rev in (base, head))
    samples = [link for link in links if link.startswith("images/plots_samples.png@")]
    assert len(samples) == 2
    assert "images/plots_loss.json.png" in links
    for link in links:
        assert_png(out / link)
    # Each revision's own confusion matrix, not the same picture twice: the stage made them differ.
    assert (out / confusion[0]).read_bytes() != (out / confusion[1]).read_bytes()
    # The sample images are the outputs of each revision, read from the DVC cache, not the workspace's.
    shades = {Image.open(out / link).getpixel((0, 0)) for link in samples}
    assert shades == {int(255 * 0.5), int(255 * 0.9)}


@pytest.mark.slow
def test_report_against_workspace_and_hosted_images(two_commits: tuple[Path, str, str], tmp_path: Path):
    repo, base, _ = two_commits
    prefix = "https://example.test/pr-7/"
    md = write_report(repo, base, None, tmp_path / "r", image_url_prefix=prefix).read_text(encoding="utf-8")
    assert md.startswith(f"# Results: `{base}` vs `workspace`")
    links = png_links(md)
    assert f"{prefix}plots_confusion.json@workspace.png" in links
    assert all(link.startswith(prefix) for link in links)
    for link in links:
        assert_png(tmp_path / "r" / "images" / link.removeprefix(prefix))


@pytest.mark.slow
def test_unknown_revision_fails_clearly_and_writes_nothing(
    two_commits: tuple[Path, str, str], tmp_path: Path
):
    repo, base, _ = two_commits
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "oracle_mnist.cli",
            "report",
            base,
            "no-such-rev",
            "-o",
            str(out),
            "--repo",
            str(repo),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "no-such-rev" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content, folders included (None), so a leftover temporary shows."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes() if path.is_file() else None
        for path in sorted(root.rglob("*"))
    }


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """`oracle-mnist report ARGV`'s error message, checked to be one clean line and exit status 1."""
    from oracle_mnist.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["report", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 1, err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.slow
def test_an_earlier_report_is_replaced_and_one_with_a_users_file_refused(
    two_commits: tuple[Path, str, str], tmp_path: Path
):
    repo, base, head = two_commits
    out = tmp_path / "report"
    write_report(repo, base, head, out)
    assert f"images/plots_confusion.json@{head}.png" in tree(out)
    md = write_report(repo, base, None, out).read_text(encoding="utf-8")
    assert md.startswith(f"# Results: `{base}` vs `workspace`")
    # All of the earlier report is gone, and nothing is left beside the folder.
    assert not [name for name in tree(out) if f"@{head}" in name]
    assert [path.name for path in tmp_path.iterdir()] == ["report"]

    (out / "notes.md").write_text("mine", encoding="utf-8")
    before = tree(tmp_path)
    with pytest.raises(OracleMnistError, match=r"not empty and not an earlier report \(it holds notes\.md\)"):
        write_report(repo, base, head, out)
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("files", "holds"),
    [
        ({"notes.md": "mine", "images/figure.png": "png"}, "notes.md"),
        # A report's names, but not written by the report.
        (
            {"report.md": "# My notes\n", "images/figure.png": "png"},
            "images, report.md: no .oracle-mnist-report",
        ),
        # An earlier report a file was added to.
        (
            {".oracle-mnist-report": "", "report.md": "# Results: `a` vs `b`\n", "images/sub/x.png": "png"},
            "images/sub",
        ),
    ],
)
def test_a_folder_that_is_not_an_earlier_report_is_refused_untouched(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, files: dict[str, str], holds: str
):
    (tmp_path / "repo").mkdir()
    out = tmp_path / "out"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text, encoding="utf-8")
    before = tree(tmp_path)
    err = refused(capsys, "main", "-o", str(out), "--repo", str(tmp_path / "repo"))
    assert f"output folder {out}: not empty and not an earlier report (it holds {holds}" in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("out", "problem"),
    [
        (".", "is the repository"),
        ("..", "is the repository"),
        ("/", "is the repository"),
        ("params.yaml", "is a file, not a folder"),
        ("params.yaml/report", "params.yaml is a file, not a folder"),
    ],
)
def test_the_repository_a_folder_above_it_or_a_file_is_refused_untouched(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    out: str,
    problem: str,
):
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "params.yaml").write_text("quality: 0.5\n", encoding="utf-8")
    (repo / "docs" / "index.md").write_text("# Docs\n", encoding="utf-8")
    monkeypatch.chdir(repo)
    before = tree(tmp_path)
    err = refused(capsys, "main", "-o", out)
    assert err.startswith(f"error: output folder {out}: ") and problem in err, err
    assert tree(tmp_path) == before


def test_an_empty_folder_and_an_earlier_report_are_accepted(tmp_path: Path) -> None:
    """Including a report from before the marker file, recognised by its title."""
    from oracle_mnist.report import check_output_folder

    (tmp_path / "empty").mkdir()
    for name in ("marked", "older"):
        (tmp_path / name / "images").mkdir(parents=True)
        (tmp_path / name / "report.md").write_text("# Results: `a` vs `b`\n", encoding="utf-8")
        (tmp_path / name / "images" / "plot.png").write_bytes(b"png")
    (tmp_path / "marked" / ".oracle-mnist-report").write_text("", encoding="utf-8")
    for name in ("new", "empty", "marked", "older"):
        check_output_folder(tmp_path / name, tmp_path / "repo")


def test_only_revision_keeps_one_revision_rows() -> None:
    spec = {
        "facet": {"column": {"field": "rev"}},
        "data": {"values": [{"rev": "a", "x": 1}, {"rev": "b", "x": 2}, {"rev": "a", "x": 3}]},
    }
    one = only_revision(spec, "a")
    assert one["data"]["values"] == [{"rev": "a", "x": 1}, {"rev": "a", "x": 3}]
    assert len(spec["data"]["values"]) == 3
    assert faceted_by_revision(spec)
    assert not faceted_by_revision({"data": {"values": []}})


def test_slug_is_file_name_safe() -> None:
    assert slug("plots/confusion.json") == "plots_confusion.json"
    assert slug("HEAD~1") == "HEAD_1"
    assert slug("refs/pull/7/merge") == "refs_pull_7_merge"


def test_results_only_in_an_unfetched_cache_are_refused_at_once(tmp_path: Path):
    """A revision whose metrics live only in DVC's cache (not in git, not fetched): an error naming the
    revision and the files, before any `dvc` command could wait on a remote."""
    from oracle_mnist.report import check_fetched, unfetched_results

    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    dvc(repo, "init", "-q")
    (repo / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: python e.py\n    outs:\n      - plots/in_git.json:\n"
        "          cache: false\n    metrics:\n      - m.json\n",
        encoding="utf-8",
    )
    (repo / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  evaluate:\n    cmd: python e.py\n    outs:\n"
        "    - path: m.json\n      md5: 0123456789abcdef0123456789abcdef\n"
        "    - path: plots/in_git.json\n      md5: fedcba9876543210fedcba9876543210\n",
        encoding="utf-8",
    )
    (repo / "plots").mkdir()
    (repo / "plots/in_git.json").write_text("[]", encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "results")
    assert unfetched_results(repo, "HEAD") == ["m.json"]
    with pytest.raises(OracleMnistError, match=r"revision HEAD: m\.json .*dvc fetch"):
        check_fetched(repo, ["HEAD"])
    # Once in the local cache, nothing is missing.
    cached = repo / ".dvc/cache/files/md5/01/23456789abcdef0123456789abcdef"
    cached.parent.mkdir(parents=True)
    cached.write_text("{}", encoding="utf-8")
    assert unfetched_results(repo, "HEAD") == []
