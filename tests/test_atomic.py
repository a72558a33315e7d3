"""healthai.atomic: a whole-file write leaves the old file or the new one, never a torn one; and the commands that
write whole files (evaluate, compare, fit's checkpoints) do so through it."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import disk_full_after, write_jsonl
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


def test_a_new_file_gets_the_permissions_open_would_give_and_a_replaced_one_keeps_its_own(tmp_path):
    # mkstemp's temporary file is 0600: renamed as it is, every report and checkpoint became private to its writer.
    umask = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "new.json", "{}\n")
        kept = tmp_path / "kept.json"
        kept.write_text("old\n")
        kept.chmod(0o640)
        atomic.write_text(kept, "new\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
    assert kept.stat().st_mode & 0o777 == 0o640


# -- the commands' whole-file writes go through healthai.atomic (#29 item 6) -------------------------------------------


def test_a_full_disk_during_evaluate_and_compare_keeps_the_previous_reports_and_leaves_no_temporary(tmp_path):
    # Once a full disk replaced the previous report with 3,964 bytes of invalid JSON.
    from healthai.compare import compare
    from healthai.evaluate import evaluate

    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": i, "diseases": "肺炎"} for i in range(4)])
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"id": i, "diseases": "肺炎"} for i in range(3)])
    outputs = {"report": tmp_path / "report.json", "per_record": tmp_path / "per_record.jsonl"}
    evaluate(preds, refs, **outputs)
    compare([f"a={preds}", f"b={refs}"], refs, report=tmp_path / "compare.json", resamples=100)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for write in (lambda: evaluate(preds, refs, report=outputs["report"]),
                  lambda: evaluate(preds, refs, per_record=outputs["per_record"]),
                  lambda: compare([f"a={preds}", f"b={refs}"], refs, report=tmp_path / "compare.json",
                                  resamples=100)):  # fmt: skip
        with disk_full_after(100), pytest.raises(OSError, match="No space left on device"):
            write()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # every report whole, nothing else
    assert json.loads(outputs["report"].read_text(encoding="utf-8"))["n"] == 4


def test_a_full_disk_while_a_checkpoint_is_saved_keeps_the_previous_one_loadable(tmp_path):
    from healthai.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    last = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(64)}, last)
    with disk_full_after(300), pytest.raises(OSError, match="No space left on device") as error:
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(4096)}, last)
    assert error.value.filename == str(last)  # named, so fit's one line says which file (#29 item 8)
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 1 and torch.equal(saved["w"], torch.ones(64))
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


def test_last_ckpt_is_linked_in_one_step_and_a_failed_copy_keeps_the_previous_one(tmp_path, monkeypatch):
    # save_last: link removed last.ckpt, then linked (or copied) the newest checkpoint: a torn copy in between.
    from healthai.checkpoint_io import AtomicCheckpointIO, atomic_link_checkpoint

    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: None))
    io, folder = AtomicCheckpointIO(), tmp_path / "ckpt"
    io.save_checkpoint({"global_step": 1}, folder / "last.ckpt")
    io.save_checkpoint({"global_step": 2}, folder / "step=2.ckpt")
    atomic_link_checkpoint(trainer, str(folder / "step=2.ckpt"), str(folder / "last.ckpt"))
    assert os.readlink(folder / "last.ckpt") == "step=2.ckpt"
    assert torch.load(folder / "last.ckpt", weights_only=True) == {"global_step": 2}

    io.save_checkpoint({"global_step": 3, "w": torch.zeros(4096)}, folder / "step=3.ckpt")

    def no_links(*args):
        raise OSError(1, "Operation not permitted")  # a filesystem without symbolic links: copied instead

    monkeypatch.setattr(os, "symlink", no_links)
    with disk_full_after(300), pytest.raises(OSError, match="No space left on device"):
        atomic_link_checkpoint(trainer, str(folder / "step=3.ckpt"), str(folder / "last.ckpt"))
    assert torch.load(folder / "last.ckpt", weights_only=True) == {"global_step": 2}
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step=2.ckpt", "step=3.ckpt"]
    atomic_link_checkpoint(trainer, str(folder / "step=3.ckpt"), str(folder / "last.ckpt"))
    assert not (folder / "last.ckpt").is_symlink() and torch.load(folder / "last.ckpt")["global_step"] == 3
