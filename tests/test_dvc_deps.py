"""dvc.yaml's deps cannot drift from the code: every library module a stage script imports, directly or through
other modules of the package (function-level imports included), must be a dep of that stage, or changing it
would not rerun the stage."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml
from helpers import REPO

PACKAGE = "oracle_mnist"


def module_file(name: str, src: Path) -> Path | None:
    """The file of `name` (dotted, e.g. oracle_mnist.images) under `src`, or None when it is not there."""
    base = src.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def package_of(path: Path, src: Path) -> str:
    """The dotted package `path` belongs to, for resolving its relative imports."""
    return ".".join(path.relative_to(src).parent.parts)


def imported_names(path: Path, src: Path) -> set[str]:
    """Every module name `path` may import, anywhere in it (top level, functions, try blocks): for
    `from a.b import c`, both a.b and a.b.c (c may be a submodule)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package_of(path, src).split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def package_files(name: str, src: Path) -> list[Path]:
    """The files Python runs to import `name` from the package: its own and those of the packages above it,
    where they hold code (an empty or docstring-only __init__.py cannot change what a stage computes)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return []
    files = []
    for i in range(1, len(parts) + 1):
        path = module_file(".".join(parts[:i]), src)
        if path is not None and (path.name != "__init__.py" or has_code(path)):
            files.append(path)
    return files


def has_code(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def library_deps(script: Path, src: Path) -> set[Path]:
    """The package's files `script` runs when it imports, followed transitively through the package."""
    found: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        for name in imported_names(path, src):
            for file in package_files(name, src):
                if file not in found:
                    found.add(file)
                    todo.append(file)
    return found


def stage_script(cmd: str | list[str], repo: Path) -> Path:
    """The Python script a stage's cmd runs (`python stages/x.py` or `torchrun ... stages/x.py`)."""
    commands = cmd if isinstance(cmd, list) else [cmd]
    scripts = [word for line in commands for word in shlex.split(line) if word.endswith(".py")]
    assert len(scripts) == 1, f"cannot tell which script runs in {cmd!r}"
    return repo / scripts[0]


def missing_deps(repo: Path) -> dict[str, list[str]]:
    """stage -> the library files it imports that its dvc.yaml deps do not cover. A listed folder covers the
    files below it that .dvcignore does not hide, as DVC itself reads .dvcignore."""
    from dvc.fs import LocalFileSystem
    from dvc.ignore import DvcIgnoreFilter

    ignored = DvcIgnoreFilter(LocalFileSystem(), str(repo))
    stages = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    src = repo / "src"
    missing = {}
    for name, stage in stages.items():
        deps = [repo / dep for dep in stage.get("deps", [])]
        needed = library_deps(stage_script(stage["cmd"], repo), src)
        absent = sorted(
            str(path.relative_to(repo))
            for path in needed
            if path not in deps
            and (not any(dep in path.parents for dep in deps) or ignored.is_ignored_file(str(path)))
        )
        if absent:
            missing[name] = absent
    return missing


def test_every_stage_depends_on_the_library_modules_it_imports():
    missing = missing_deps(REPO)
    assert not missing, "dvc.yaml: deps missing from stages:\n" + "\n".join(
        f"  {stage}: {', '.join(files)}" for stage, files in missing.items()
    )


def test_every_stage_script_is_covered_by_a_dep_of_its_stage():
    """The script itself or a folder above it (dvc.yaml lists stages/ once per stage)."""
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"].items():
        script = stage_script(stage["cmd"], REPO)
        deps = [REPO / dep for dep in stage["deps"]]
        assert script in deps or any(dep in script.parents for dep in deps), name


@pytest.fixture
def toy_repo(tmp_path: Path) -> Path:
    """A package where a stage reaches a module only through a function-level and a relative import."""
    pkg = tmp_path / "src" / PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Docstring only."""\n')
    (pkg / "a.py").write_text("def f():\n    from . import b\n    return b\n")
    (pkg / "b.py").write_text("from .c import VALUE\n")
    (pkg / "c.py").write_text("import numpy\nVALUE = 1\n")
    (pkg / "unused.py").write_text("")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "s.py").write_text(f"from {PACKAGE} import a\n")
    return tmp_path


def write_stage(repo: Path, deps: list[str]) -> None:
    stage = {"cmd": "python stages/s.py", "deps": ["stages/s.py", *deps]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": stage}}), encoding="utf-8")


def test_deps_are_followed_through_function_level_and_relative_imports(toy_repo: Path):
    write_stage(toy_repo, ["src/oracle_mnist/a.py"])
    assert missing_deps(toy_repo) == {"s": ["src/oracle_mnist/b.py", "src/oracle_mnist/c.py"]}
    write_stage(toy_repo, [f"src/oracle_mnist/{m}.py" for m in "abc"])
    assert missing_deps(toy_repo) == {}
    write_stage(toy_repo, ["src/oracle_mnist"])
    assert missing_deps(toy_repo) == {}


def test_a_folder_dep_does_not_cover_what_dvcignore_hides(toy_repo: Path):
    write_stage(toy_repo, ["src/oracle_mnist"])
    (toy_repo / ".dvcignore").write_text("src/oracle_mnist/c.py\n", encoding="utf-8")
    assert missing_deps(toy_repo) == {"s": ["src/oracle_mnist/c.py"]}


def test_a_package_init_with_code_is_a_dep(toy_repo: Path):
    (toy_repo / "src" / PACKAGE / "__init__.py").write_text("SETTING = 1\n")
    write_stage(toy_repo, [f"src/oracle_mnist/{m}.py" for m in "abc"])
    assert missing_deps(toy_repo) == {"s": ["src/oracle_mnist/__init__.py"]}
