"""healthai.shared_folder from one rank's side (the collective itself runs in tests/test_multi_node.py's predict on two
nodes): fit's checkpoint folder is refused in one line when rank 0's marker is not there for this rank, and passes
where it is. On one machine two ranks cannot be given different folders of the same absolute path (Lightning hands
every rank rank 0's resolved checkpoint folder), so the refusal is asserted here with rank 0 played by the test."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from healthai.errors import UserError
from healthai.shared_folder import check_checkpoints_shared


class RankOneOfTwo:
    """Rank 1's view of a 2-process strategy, where rank 0 (another node) drew ``token`` and saw its own marker."""

    world_size, global_rank, root_device = 2, 1, torch.device("cpu")

    def __init__(self, token: str):
        self.token = token

    def broadcast(self, obj):
        return self.token

    def barrier(self, name=None):
        pass

    def reduce(self, tensor, reduce_op=None):
        return tensor  # + rank 0's 0: it sees the marker it wrote


def trainer(folder: Path, token: str) -> SimpleNamespace:
    checkpoint = ModelCheckpoint(dirpath=folder, save_last=True)
    return SimpleNamespace(strategy=RankOneOfTwo(token), checkpoint_callbacks=[checkpoint, checkpoint])


def test_a_checkpoint_folder_this_rank_cannot_see_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError) as refused:
        check_checkpoints_shared(trainer(tmp_path / "ckpt", "abc"))
    assert str(refused.value) == (
        f"--trainer.callbacks.dirpath {tmp_path / 'ckpt'}: 1 of 2 processes cannot see this folder (a file written "
        "there by rank 0 is missing on their node): put it on a filesystem every node shares, where every rank reads "
        "the checkpoint a resume starts from")  # fmt: skip


def test_a_checkpoint_folder_holding_rank_zeros_marker_passes(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / ".healthai-shared-abc").write_bytes(b"")  # rank 0 wrote it, on the shared filesystem
    check_checkpoints_shared(trainer(tmp_path / "ckpt", "abc"))
