"""The GCS remote for real, against gcp-storage-emulator on 127.0.0.1: a pushed result comes back on a fresh
clone and reproduces nothing; a corrupted remote object is refused; a remote that stops answering fails
clearly in bounded time; a clone without credentials is refused in seconds off Google Cloud (NO_GCE_CHECK);
a clone's own remote (`dvc remote add --local -d`) serves it without touching git. The session's shrunken
pipeline (TEST_PARAMS) is pushed once for the module."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from configobj import ConfigObj
from helpers import REPO, QuietHandler, dvc, free_port, git, serve_command, serve_directory, write_params

from oracle_mnist.fsutil import sha256_file
from oracle_mnist.report import write_report

# The GCS emulator, dvc repro/push/pull: the full suite's, not the edit loop's.
pytestmark = pytest.mark.slow

REMOTE = "gcs"
# fsspec hands FSSPEC_GS_<KWARG> to gcsfs: a per-request timeout, the one bound dvc-gs has on a silent remote.
REQUEST_TIMEOUT_ENV = "FSSPEC_GS_REQUESTS_TIMEOUT"
# What Google Cloud Storage answers an anonymous caller of a private bucket (a clone without credentials).
ANONYMOUS_REFUSED = "Anonymous caller does not have storage.objects.list access"


def committed_remote_url() -> tuple[str, str]:
    """(bucket, path) of the remote the repository commits, so the test exercises that very setting."""
    # DVC's own config reader (configobj), on the file only: no dvc command runs in the real repository.
    url = ConfigObj(str(REPO / ".dvc" / "config"))[f'remote "{REMOTE}"']["url"]
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "gs", url
    return parts.netloc, parts.path.strip("/")


class Emulator:
    def __init__(self, port: int, bucket: str, prefix: str) -> None:
        self.endpoint = f"http://127.0.0.1:{port}"
        self.bucket = bucket
        self.prefix = prefix

    def names(self) -> list[str]:
        names: list[str] = []
        token = ""
        while True:
            url = f"{self.endpoint}/storage/v1/b/{self.bucket}/o?prefix={self.prefix}/{token}"
            with urllib.request.urlopen(url, timeout=10) as resp:
                page = json.load(resp)
            names += [item["name"] for item in page.get("items", [])]
            if not page.get("nextPageToken"):
                return names
            token = f"&pageToken={page['nextPageToken']}"

    def read(self, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        url = f"{self.endpoint}/download/storage/v1/b/{self.bucket}/o/{quoted}?alt=media"
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.read()

    def write(self, name: str, data: bytes) -> None:
        quoted = urllib.parse.quote(name, safe="")
        url = f"{self.endpoint}/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name={quoted}"
        request = urllib.request.Request(
            url, data=data, method="POST", headers={"Content-Type": "application/octet-stream"}
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    bucket, prefix = committed_remote_url()
    port = free_port()
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--in-memory", "--default-bucket", bucket]
    with serve_command(cmd, f"http://127.0.0.1:{port}/storage/v1/b/{bucket}", startup_timeout=30):
        yield Emulator(port, bucket, prefix)


def use_endpoint(repo: Path, endpoint: str) -> None:
    """What a user does once per clone, kept out of git: where the remote is and how to log in."""
    dvc(repo, "remote", "modify", "--local", REMOTE, "endpointurl", endpoint)
    dvc(repo, "remote", "modify", "--local", REMOTE, "allow_anonymous_login", "true")


def lock_outs(repo: Path) -> dict[str, str]:
    """path -> md5 of every output recorded in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def in_git(repo: Path, path: str) -> bool:
    """`cache: false` outputs travel in git (committed metrics, small plots), not through the remote."""
    return git(repo, "ls-files", "--error-unmatch", path, check=False).returncode == 0


def cached_files(repo: Path) -> list[tuple[str, str, str]]:
    """(output, file, md5) of every file the remote holds, single-file outputs (the model) first."""
    singles, in_dirs = [], []
    for out, md5 in lock_outs(repo).items():
        if in_git(repo, out):
            continue
        if not md5.endswith(".dir"):
            singles.append((out, out, md5))
            continue
        listing = json.loads((repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_text())
        in_dirs += [(out, f"{out}/{entry['relpath']}", entry["md5"]) for entry in listing]
    return sorted(singles) + sorted(in_dirs)


def tree_digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): sha256_file(f) for f in files}


@pytest.fixture(scope="module")
def origin(emulator: Emulator, pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shrunken pipeline's results (a copy of the session's run: one `dvc repro` fewer in the suite)
    committed (dvc.lock) and pushed with the run-cache."""
    repo = Path(shutil.copytree(pipeline, tmp_path_factory.mktemp("origin") / "repo", symlinks=True))
    use_endpoint(repo, emulator.endpoint)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "results")
    dvc(repo, "push", "--run-cache")
    return repo


def fresh_clone(origin: Path, dest: Path, endpoint: str) -> Path:
    git(dest.parent, "clone", "-q", str(origin), dest.name)
    use_endpoint(dest, endpoint)
    return dest


def test_committed_config_names_a_verified_gcs_remote_without_credentials() -> None:
    config = ConfigObj(str(REPO / ".dvc" / "config"))
    assert config["core"]["remote"] == REMOTE
    remote = config[f'remote "{REMOTE}"']
    assert remote["url"].startswith("gs://") and remote["verify"] == "true"
    assert not {"credentialpath", "endpointurl", "allow_anonymous_login"} & set(remote)
    assert "/config.local" in (REPO / ".dvc" / ".gitignore").read_text().split()


def test_push_holds_every_output_and_the_run_cache(origin: Path, emulator: Emulator) -> None:
    names = emulator.names()
    stored = {name.split("/files/md5/", 1)[1].replace("/", "") for name in names if "/files/md5/" in name}
    for path, md5 in lock_outs(origin).items():
        if in_git(origin, path):
            continue
        assert md5 in stored, f"{path} ({md5}) not pushed"
        if md5.endswith(".dir"):
            listing = json.loads((origin / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_text())
            missing = [entry["relpath"] for entry in listing if entry["md5"] not in stored]
            assert not missing, f"{path}: files not pushed: {missing}"
    assert any(f"{emulator.prefix}/runs/" in name for name in names), "run-cache not pushed"


def test_fresh_clone_pulls_the_result_and_reproduces_nothing(
    origin: Path, emulator: Emulator, tmp_path: Path
) -> None:
    clone = fresh_clone(origin, tmp_path / "clone", emulator.endpoint)
    outs = lock_outs(clone)
    assert not any((clone / path).exists() for path in outs if not in_git(clone, path))

    dvc(clone, "pull")
    for path in outs:
        assert tree_digest(clone / path) == tree_digest(origin / path), path

    status = dvc(clone, "status")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    repro = dvc(clone, "repro")
    assert "Running stage" not in repro.stdout, repro.stdout
    assert "Data and pipelines are up to date." in repro.stdout, repro.stdout
    assert git(clone, "status", "--porcelain").stdout == ""


def test_report_compares_the_pulled_result_with_a_changed_one(
    origin: Path, emulator: Emulator, tmp_path: Path
) -> None:
    """The PR report on the real pipeline: the base read from the pulled cache, the head reproduced."""
    clone = fresh_clone(origin, tmp_path / "clone", emulator.endpoint)
    dvc(clone, "pull")
    write_params(clone, {"evaluate": {"max_misclassified": 4}})
    repro = dvc(clone, "repro")
    assert "Running stage 'evaluate'" in repro.stdout and "Running stage 'train'" not in repro.stdout

    md = write_report(clone, "HEAD", None, tmp_path / "report").read_text(encoding="utf-8")
    assert "evaluate.max_misclassified" in md
    for rev in ("HEAD", "workspace"):
        for plot in ("Confusion_matrix", "Confusion_matrix_normalised", "plots_misclassified.png"):
            image = tmp_path / "report" / "images" / f"{plot}@{rev}.png"
            assert f"(images/{image.name})" in md, image.name
            assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    misclassified = [
        tmp_path / "report/images" / f"plots_misclassified.png@{rev}.png" for rev in ("HEAD", "workspace")
    ]
    assert misclassified[0].read_bytes() != misclassified[1].read_bytes()


def test_corrupted_remote_object_is_detected_and_not_used(
    origin: Path, emulator: Emulator, tmp_path: Path
) -> None:
    out, path, md5 = cached_files(origin)[0]
    name = f"{emulator.prefix}/files/md5/{md5[:2]}/{md5[2:]}"
    original = emulator.read(name)
    emulator.write(name, b"corrupted on the remote " + original[:64])
    try:
        clone = fresh_clone(origin, tmp_path / "clone", emulator.endpoint)
        proc = dvc(clone, "pull", check=False)
    finally:
        emulator.write(name, original)

    assert proc.returncode != 0
    assert out in proc.stderr, proc.stderr
    assert not (clone / path).exists(), f"corrupted {path} was placed in the workspace"
    assert not (clone / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).exists(), "corrupted object kept in cache"
    # Nothing bad was remembered: once the remote is repaired, the same clone pulls the exact result.
    dvc(clone, "pull")
    for other in lock_outs(origin):
        assert tree_digest(clone / other) == tree_digest(origin / other), other


def test_silent_remote_fails_clearly_in_bounded_time(origin: Path, tmp_path: Path) -> None:
    timeout_s = 1
    cached = [out for out in lock_outs(origin) if not in_git(origin, out)]
    # Measured: DVC asks for each output's object about three times, each request waits `timeout_s`, and
    # gives up with no retry on a timeout; plus its own start-up.
    bound_s = 3 * len(cached) * (timeout_s + 1) + 20
    # A listening socket that never accepts: connections open, requests go out, no answer ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(128)
        clone = fresh_clone(origin, tmp_path / "clone", f"http://127.0.0.1:{silent.getsockname()[1]}")
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "dvc", "pull"],
                cwd=clone,
                env={**os.environ, REQUEST_TIMEOUT_ENV: str(timeout_s)},
                capture_output=True,
                text=True,
                timeout=bound_s,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"dvc pull still running after {bound_s} s against a silent remote")

    assert proc.returncode != 0
    bucket, prefix = committed_remote_url()
    assert f"failed to connect to gs ({bucket}/{prefix}/" in proc.stderr, proc.stderr
    assert "failed to pull data from the cloud" in proc.stderr, proc.stderr
    assert not any((clone / out).exists() for out in cached)


class RefusesAnonymous(QuietHandler):
    """Every request gets GCS's 401 for an anonymous caller, as the team's bucket answers a stranger's clone."""

    def refuse(self) -> None:
        message = f"{ANONYMOUS_REFUSED} to the Google Cloud Storage bucket."
        body = json.dumps({"error": {"code": 401, "message": message, "errors": [{"message": message}]}})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_HEAD = do_POST = refuse


def test_clone_without_credentials_fails_fast_off_google_cloud(origin: Path, tmp_path: Path) -> None:
    """docs/remotes.md: off Google Cloud, NO_GCE_CHECK=true turns `dvc pull` without credentials into a quick,
    plain refusal. Without it the Google libraries first look for a Compute Engine metadata server: against
    the silent one below, 68 s before the same refusal (17 s where its host name does not resolve)."""
    bound_s = 30
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(origin), clone.name)
    # A listening socket that never accepts: a metadata address that swallows packets, as off Google Cloud.
    with socket.socket() as silent, serve_directory(tmp_path, RefusesAnonymous) as bucket:
        silent.bind(("127.0.0.1", 0))
        silent.listen(128)
        metadata = f"127.0.0.1:{silent.getsockname()[1]}"
        # The path names Google's host: gcsfs then treats the endpoint as Google's own and looks for
        # credentials as it does for the committed gs:// URL, metadata server included.
        dvc(clone, "remote", "modify", "--local", REMOTE, "endpointurl", f"{bucket}storage.googleapis.com")
        # No key file, no request timeout, and gcsfs's default features, as on a user's machine.
        dropped = {"GOOGLE_APPLICATION_CREDENTIALS", REQUEST_TIMEOUT_ENV, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env |= {
            "CLOUDSDK_CONFIG": str(tmp_path / "no-gcloud"),  # no `gcloud auth application-default login`
            "GCE_METADATA_HOST": metadata,
            "GCE_METADATA_IP": metadata,
            "NO_GCE_CHECK": "true",
        }
        start = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "dvc", "pull"],
                cwd=clone,
                env=env,
                capture_output=True,
                text=True,
                timeout=bound_s,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"dvc pull without credentials still running after {bound_s} s")
        elapsed = time.monotonic() - start

    assert proc.returncode != 0
    bucket_name, prefix = committed_remote_url()
    assert f"ERROR: failed to connect to gs ({bucket_name}/{prefix}/" in proc.stderr, proc.stderr
    assert ANONYMOUS_REFUSED in proc.stderr, proc.stderr
    assert "failed to pull data from the cloud" in proc.stderr, proc.stderr
    assert elapsed < bound_s


def test_own_remote_for_one_clone_leaves_the_committed_config_alone(
    origin: Path, emulator: Emulator, tmp_path: Path
) -> None:
    """docs/remotes.md, "Using your own remote": `dvc remote add --local -d` points a clone at other storage
    (a folder here); push and pull go there, the team's remote is never asked (this test gives the second
    clone no way to reach it), and git sees no change."""
    storage = tmp_path / "storage"
    first = fresh_clone(origin, tmp_path / "first", emulator.endpoint)
    dvc(first, "pull")
    dvc(first, "remote", "add", "--local", "-d", "mine", str(storage))
    dvc(first, "push")
    assert (storage / "files" / "md5").is_dir()

    second = tmp_path / "second"
    git(tmp_path, "clone", "-q", str(origin), second.name)
    dvc(second, "remote", "add", "--local", "-d", "mine", str(storage))
    dvc(second, "pull", timeout=120)
    for path in lock_outs(origin):
        assert tree_digest(second / path) == tree_digest(origin / path), path
    assert "Data and pipelines are up to date." in dvc(second, "status").stdout
    for clone in (first, second):
        assert git(clone, "status", "--porcelain").stdout == ""
        assert ConfigObj(str(clone / ".dvc" / "config"))["core"]["remote"] == REMOTE
