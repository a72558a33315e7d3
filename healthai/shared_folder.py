"""Whether a folder is one that every rank sees (#32 item 3): predict's ranks each write a shard next to the output and
rank 0 merges them all, so on several nodes the output folder must be on a shared filesystem. A node-local folder of
the same path would leave rank 0 merging its own node's shards only; it is refused at start instead, in one line.
Likewise fit's checkpoint folder: rank 0 writes the checkpoints and a resume (``--ckpt_path last``, a requeued job)
reads them on every rank, so a node-local folder would only be found out when the job restarts, hours later.

The check is what the ranks see, not a filesystem type (an NFS, Lustre or GPFS mount may be shared or not): rank 0
writes a marker file with a name drawn for this run, and every rank looks for it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import torch

from healthai.errors import UserError


MERGE = "where rank 0 can merge every rank's shard"


def check_shared(folder: Path, strategy, option: str, why: str = MERGE) -> None:
    """Refuse (:class:`UserError`, on every rank) ``folder`` when a rank of ``strategy`` (a Lightning strategy) cannot
    see a file rank 0 wrote in it (rank 0 creates the folder); nothing to do in one process. Collective: every rank
    calls it. ``option`` names the setting in the refusal, ``why`` says what needs the folder shared."""
    if strategy.world_size < 2:
        return
    marker = Path(folder) / f".healthai-shared-{strategy.broadcast(uuid.uuid4().hex)}"
    if strategy.global_rank == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_bytes(b"")
    strategy.barrier("healthai-shared-folder-written")
    try:
        unseen = strategy.reduce(torch.tensor(0.0 if marker.exists() else 1.0, device=strategy.root_device),
                                 reduce_op="sum")  # fmt: skip
    finally:
        strategy.barrier("healthai-shared-folder-read")
        if strategy.global_rank == 0:
            marker.unlink(missing_ok=True)
    if int(unseen):
        raise UserError(f"{option} {folder}: {int(unseen)} of {strategy.world_size} processes cannot see this folder "
                        f"(a file written there by rank 0 is missing on their node): put it on a filesystem every node "
                        f"shares, {why}")  # fmt: skip


def check_checkpoints_shared(trainer) -> None:
    """fit on several processes: refuse, at start, a checkpoint folder that a rank cannot see (one line, on every
    rank). Collective: every rank calls it, after the checkpoint callbacks resolved their folders."""
    folders = {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
    for folder in sorted(folders):
        check_shared(folder, trainer.strategy, "--trainer.callbacks.dirpath",
                     "where every rank reads the checkpoint a resume starts from")  # fmt: skip
