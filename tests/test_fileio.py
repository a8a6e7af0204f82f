"""fileio.atomic_path: all or nothing, and only a dead writer's temporary file is cleaned up."""

import os
import subprocess
import sys

import pytest

from idql_cm.fileio import atomic_path, atomic_write, pid_alive


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "r.json"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        open(tmp, "w").write("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["r.json"]


def test_only_dead_writers_temporaries_are_removed(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    assert not pid_alive(dead) and pid_alive(live)
    stale = tmp_path / f".r.json.{dead}.0123abcd.tmp"
    other_live = tmp_path / f".r.json.{live}.89abcdef.tmp"  # another process is writing the same file right now
    stale.write_text("x"), other_live.write_text("y")
    atomic_write(tmp_path / "r.json", "new")
    assert (tmp_path / "r.json").read_text() == "new"
    assert not stale.exists() and other_live.exists()
