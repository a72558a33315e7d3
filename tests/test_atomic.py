"""healthai.atomic: a whole-file write leaves the old file or the new one, never a torn one."""
import os

import pytest

from healthai import atomic


def test_write_text_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic.write_text(path, "old\n")
    atomic.write_text(path, "new\n")
    assert path.read_text(encoding="utf-8") == "new\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "report.json"
    atomic.write_text(path, "previous\n")
    with pytest.raises(OSError, match="No space left"):
        with atomic.atomic_open(path) as f:
            f.write("half of it")
            raise OSError(28, os.strerror(28))
    assert path.read_text(encoding="utf-8") == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_folder_replaces_a_whole_folder_or_nothing(tmp_path):
    out = tmp_path / "export"
    with atomic.atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic.atomic_folder(out) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("killed half-way")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    with atomic.atomic_folder(out) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
