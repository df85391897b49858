import hashlib
import os
import subprocess

import pytest

from oracle_mnist.fsutil import atomic_dir, atomic_path, git_blob_id, sha256_file, write_json


def test_atomic_path_renames_on_success_with_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_path_leaves_old_file_and_no_temp_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_replaces_whole_directory_or_nothing(tmp_path):
    target = tmp_path / "features"
    target.mkdir()
    (target / "stale.npz").write_text("stale")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new.npz").write_text("new")
        raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["stale.npz"]
    with atomic_dir(target) as tmp:
        (tmp / "new.npz").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_write_json_keeps_unicode(tmp_path):
    write_json(tmp_path / "m.json", {"name": "大", "acc": 0.5})
    assert tmp_path.joinpath("m.json").read_text(encoding="utf-8") == '{\n  "name": "大",\n  "acc": 0.5\n}\n'


def test_hashes_match_reference_tools(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 10
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True)
    assert git_blob_id(data) == expected.stdout.strip()


def test_leftovers_of_interrupted_writes_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [
        f".out.txt.{dead.pid}-a1b2c3d4.tmp",  # a killed writer's file
        ".out.txt.k2j4_x9z.tmp",  # from before pids were in the name
    ]
    live = f".out.txt.{os.getpid()}-zzzzzzzz.tmp"  # a writer that is still running
    unrelated = [".other.txt.k2j4_x9z.tmp", ".out.txt.keep", "out.txt.k2j4_x9z.tmp"]
    for name in [*stale, live, *unrelated]:
        (tmp_path / name).write_text("x")
    (tmp_path / f".features.{dead.pid}-q1w2e3r4.tmp").mkdir()
    (tmp_path / f".features.{dead.pid}-q1w2e3r4.tmp" / "train.npz").write_text("x")
    (tmp_path / ".features.old").mkdir()
    with atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("done")
    with atomic_dir(tmp_path / "features") as tmp:
        (tmp / "new.npz").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, *unrelated, "features", "out.txt"])


def test_temporary_names_carry_the_writer_pid(tmp_path):
    with atomic_path(tmp_path / "out.txt") as tmp:
        assert tmp.name.startswith(f".out.txt.{os.getpid()}-") and tmp.name.endswith(".tmp")
    with atomic_dir(tmp_path / "d") as tmp:
        assert tmp.name.startswith(f".d.{os.getpid()}-") and tmp.name.endswith(".tmp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
