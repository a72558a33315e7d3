"""Whether a folder is one that every rank sees (#32 item 3): predict's ranks each write a shard next to the output and
rank 0 merges them all, so on several nodes the output folder must be on a shared filesystem. A node-local folder of
the same path would leave rank 0 merging its own node's shards only; it is refused at start instead, in one line.

The check is what the ranks see, not a filesystem type (an NFS, Lustre or GPFS mount may be shared or not): rank 0
writes a marker file with a name drawn for this run, and every rank looks for it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import torch

from healthai.errors import UserError


def check_shared(folder: Path, strategy, option: str) -> None:
    """Refuse (:class:`UserError`, on every rank) ``folder`` when a rank of ``strategy`` (a Lightning strategy) cannot
    see a file rank 0 wrote in it; nothing to do in one process. Collective: every rank calls it. ``option``
    names the setting in the refusal."""
    if strategy.world_size < 2:
        return
    marker = Path(folder) / f".healthai-shared-{strategy.broadcast(uuid.uuid4().hex)}"
    if strategy.global_rank == 0:
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
                        "(a file written there by rank 0 is missing on their node): put it on a filesystem every node "
                        "shares, where rank 0 can merge every rank's shard")  # fmt: skip
