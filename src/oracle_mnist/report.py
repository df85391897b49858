"""Compare the results of two revisions as one markdown file with PNG plots, without a browser.

The pull-request workflow posts this report as a comment; `oracle-mnist report BASE [HEAD] -o DIR` writes the
same thing locally. Everything is read through DVC itself (`dvc metrics diff`, `dvc params diff`,
`dvc plots diff`) at each revision: no file is copied from one checkout to another, so a stale "previous"
result cannot leak in. The small results are kept in git (`cache: false` in dvc.yaml), so no remote is needed;
a revision whose results live only in DVC's cache and are not fetched is refused at once (DVC itself would
wait minutes on an unreachable remote and then report nothing).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from oracle_mnist.errors import OracleMnistError
from oracle_mnist.fsutil import atomic_dir

WORKSPACE = "workspace"
# Written into every report folder: the report replaces its folder as a whole, so it replaces only a folder
# it recognises as its own (this file, report.md and images/, nothing else), never a user's folder.
MARKER = ".oracle-mnist-report"
MARKER_TEXT = "Written by `oracle-mnist report`; the next report into this folder replaces all of it.\n"
REPORT_FILES = {MARKER, "report.md", "images"}
TITLE = "# Results: `"
# Reading an old revision may fetch its outputs from the remote first; a hung remote must not hang CI.
DVC_TIMEOUT_S = 900.0


def run_dvc(args: list[str], repo: Path, timeout: float = DVC_TIMEOUT_S) -> str:
    """Run `dvc ARGS` in `repo` and return its stdout; any failure names the command and DVC's message."""
    cmd = [sys.executable, "-m", "dvc", *args]
    try:
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OracleMnistError(
            f"`dvc {' '.join(args)}` in {repo}: no answer within {timeout:.0f} s"
        ) from None
    if proc.returncode != 0:
        message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise OracleMnistError(
            f"`dvc {' '.join(args)}` in {repo} exited {proc.returncode}: {' / '.join(message[-3:])}"
        )
    return proc.stdout


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)


def _result_paths(dvc_yaml: dict[str, Any]) -> set[str]:
    """Metrics and plot files a revision's dvc.yaml declares (the small results a report reads)."""
    paths: set[str] = set()
    for stage in (dvc_yaml.get("stages") or {}).values():
        for key in ("metrics", "plots"):
            for out in stage.get(key) or []:
                paths.add(next(iter(out)) if isinstance(out, dict) else out)
    for plot in dvc_yaml.get("plots") or []:
        name, spec = next(iter(plot.items())) if isinstance(plot, dict) else (plot, None)
        y = spec.get("y") if isinstance(spec, dict) else None
        paths.update(y if isinstance(y, dict) else [name])
    return paths


def _local_cache(repo: Path) -> Any:
    """The repository's local DVC cache, wherever `cache.dir` puts it (a team's shared cache, say)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return dvc_repo.cache.local


def unfetched_results(repo: Path, rev: str) -> list[str]:
    """Results of `rev` that are neither in git nor in the local DVC cache: only a remote could supply them."""
    shown = [_git(repo, "show", f"{rev}:{name}") for name in ("dvc.yaml", "dvc.lock")]
    if any(proc.returncode != 0 for proc in shown):
        return []  # no pipeline at that revision: nothing DVC could fetch
    dvc_yaml, dvc_lock = (yaml.safe_load(proc.stdout) or {} for proc in shown)
    locked = {
        out["path"]: out.get("md5", "")
        for stage in (dvc_lock.get("stages") or {}).values()
        for out in stage.get("outs") or []
    }
    cache = _local_cache(repo)
    missing = []
    for path in sorted(_result_paths(dvc_yaml)):
        if _git(repo, "cat-file", "-e", f"{rev}:{path}").returncode == 0:
            continue
        owner = next((out for out in locked if path == out or path.startswith(f"{out}/")), None)
        if owner is not None and locked[owner] and not Path(cache.oid_to_path(locked[owner])).is_file():
            missing.append(path)
    return missing


def check_fetched(repo: Path, revs: list[str]) -> None:
    for rev in revs:
        missing = unfetched_results(repo, rev)
        if missing:
            raise OracleMnistError(
                f"revision {rev}: {', '.join(missing)} are kept only in DVC's cache and are not in the local "
                f"cache; run `git checkout {rev} && dvc fetch` (or `dvc pull`) while the remote is reachable, "
                "then report again"
            )


def _foreign_entries(folder: Path) -> list[str]:
    """What in `folder` an earlier report did not write: empty for an earlier report or an empty folder."""
    entries = {entry.name: entry for entry in folder.iterdir()}
    foreign = sorted(set(entries) - REPORT_FILES)
    images = entries.get("images")
    if images is not None and (images.is_symlink() or not images.is_dir()):
        foreign.append("images (not a folder)")
    elif images is not None:
        foreign += [
            f"images/{entry.name}"
            for entry in sorted(images.iterdir())
            if entry.is_symlink() or not entry.is_file()
        ]
    marker = entries.get(MARKER)
    if marker is not None and (marker.is_symlink() or not marker.is_file()):
        foreign.append(f"{MARKER} (not a file)")
    # Reports from before the marker are recognised by their title.
    if entries and not foreign and marker is None and not _report_md(entries.get("report.md")):
        foreign.append(f"{', '.join(sorted(entries))}: no {MARKER}, and report.md is not a report's")
    return foreign


def _report_md(path: Path | None) -> bool:
    if path is None or path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(len(TITLE)) == TITLE.encode()


def check_output_folder(out: Path, repo: Path) -> None:
    """Refuse an output folder the report must not replace: anything but a new folder, an empty one or an
    earlier report (the repository, the current folder or one above them, a file, a folder of other files)."""
    where = Path(out).absolute()
    resolved = Path(os.path.realpath(where))
    for name, inside in (("the repository", Path(repo)), ("the current folder", Path.cwd())):
        inside = Path(os.path.realpath(inside))
        if resolved == inside or resolved in inside.parents:
            raise OracleMnistError(
                f"output folder {out}: is {name} ({inside}) or a folder above it; the report replaces its "
                "folder as a whole, so give it a folder of its own (default: report)"
            )
    if where.is_symlink():
        raise OracleMnistError(
            f"output folder {out}: is a symlink (to {os.readlink(where)}); give a real folder"
        )
    if where.exists() and not where.is_dir():
        raise OracleMnistError(f"output folder {out}: is a file, not a folder; nothing was written")
    above = next(parent for parent in where.parents if parent.exists())
    if not above.is_dir():
        raise OracleMnistError(f"output folder {out}: {above} is a file, not a folder; nothing was written")
    if not where.is_dir():
        return
    try:
        foreign = _foreign_entries(where)
    except OSError as exc:
        raise OracleMnistError(f"output folder {out}: cannot be read: {exc.strerror or exc}") from None
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OracleMnistError(
            f"output folder {out}: not empty and not an earlier report (it holds {shown}); the report "
            "replaces its folder as a whole, so give a new or empty folder, or remove this one first; "
            "nothing was written"
        )


def slug(text: str) -> str:
    """A file-name-safe form of a plot path or revision (`plots/confusion.json@HEAD~1` -> `plots_confusion.json_HEAD_1`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def render_png(spec: dict[str, Any]) -> bytes:
    """Render a Vega-Lite spec to PNG offline: data is inline, and no URL may be fetched."""
    import vl_convert

    try:
        return vl_convert.vegalite_to_png(spec, scale=1.0, allowed_base_urls=[])
    except ValueError as exc:
        title = spec.get("title", {})
        name = title.get("text", "?") if isinstance(title, dict) else title
        raise OracleMnistError(f"plot {name}: Vega-Lite could not render it: {exc}") from None


def only_revision(spec: dict[str, Any], rev: str) -> dict[str, Any]:
    """The same chart with the data of one revision only."""
    one = copy.deepcopy(spec)
    one["data"]["values"] = [row for row in spec["data"]["values"] if row.get("rev") == rev]
    return one


def faceted_by_revision(spec: dict[str, Any]) -> bool:
    """True for charts DVC draws once per revision (confusion matrices); lines are overlaid instead."""
    column = spec.get("facet", {}).get("column", {})
    return isinstance(column, dict) and column.get("field") == "rev"


def _image(alt: str, target: str) -> str:
    return f"![{alt}]({target})"


def plot_sections(
    plots: dict[str, list[dict[str, Any]]], revs: list[str], images: Path, link: str
) -> list[str]:
    """Markdown for every plot: one column per revision, or one overlaid chart; PNGs written to `images`."""
    lines: list[str] = []
    for name in sorted(plots):
        per_rev: dict[str, str] = {}
        overlay: str | None = None
        for entry in plots[name]:
            if entry["type"] == "image":
                (rev,) = entry["revisions"]
                file = f"{slug(name)}@{slug(rev)}{Path(entry['url']).suffix}"
                shutil.copyfile(entry["url"], images / file)
                per_rev[rev] = file
            elif entry["type"] == "vega" and faceted_by_revision(entry["content"]):
                for rev in entry["revisions"]:
                    file = f"{slug(name)}@{slug(rev)}.png"
                    (images / file).write_bytes(render_png(only_revision(entry["content"], rev)))
                    per_rev[rev] = file
            elif entry["type"] == "vega":
                overlay = f"{slug(name)}.png"
                (images / overlay).write_bytes(render_png(entry["content"]))
        lines += [f"### `{name}`", ""]
        if overlay:
            lines += [_image(f"{name}: {' vs '.join(revs)}", f"{link}{overlay}"), ""]
        if per_rev:
            lines += [
                "| " + " | ".join(f"`{rev}`" for rev in revs) + " |",
                "|" + " --- |" * len(revs),
                "| "
                + " | ".join(
                    _image(f"{name} at {rev}", f"{link}{per_rev[rev]}") if rev in per_rev else "(absent)"
                    for rev in revs
                )
                + " |",
                "",
            ]
    return lines


def write_report(repo: Path, base: str, head: str | None, out: Path, image_url_prefix: str = "") -> Path:
    """Write OUT/report.md and OUT/images/*.png comparing `base` with `head` (None: the workspace).

    `image_url_prefix` replaces the relative `images/` links, for a comment whose images are hosted elsewhere.
    """
    check_output_folder(out, repo)
    revs = [base, head or WORKSPACE]
    rev_args = [base] if head is None else [base, head]
    check_fetched(repo, rev_args)
    metrics = run_dvc(["metrics", "diff", *rev_args, "--md"], repo).strip()
    params = run_dvc(["params", "diff", *rev_args, "--md"], repo).strip()
    link = image_url_prefix or "images/"
    with tempfile.TemporaryDirectory(prefix="oracle-mnist-plots-") as tmp:
        raw = json.loads(run_dvc(["plots", "diff", *rev_args, "--json", "-o", tmp], repo) or "{}")
        with atomic_dir(out) as staging:
            images = staging / "images"
            images.mkdir()
            plot_lines = plot_sections(raw.get("data", {}), revs, images, link)
            lines = [
                f"{TITLE}{revs[0]}` vs `{revs[1]}`",
                "",
                "## Metrics",
                "",
                metrics or "No metric changed.",
                "",
                "## Params",
                "",
                params or "No parameter changed.",
                "",
                "## Plots",
                "",
                *(plot_lines or ["No plots."]),
            ]
            errors = raw.get("errors")
            if errors:
                lines += ["", "Plots DVC could not read:", "", "```", json.dumps(errors, indent=1), "```"]
            (staging / "report.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
            (staging / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
            # Again just before the swap: DVC ran for a while, and a file put in the folder meanwhile is kept.
            check_output_folder(out, repo)
    return out / "report.md"
