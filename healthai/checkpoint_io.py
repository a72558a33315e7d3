"""fit's checkpoints, ``last.ckpt`` included, are all or nothing (#29 item 6): a full disk or a kill while one is
written leaves the previous one in place and loadable, never a torn file that ``--ckpt_path last`` would start from.

Two ways a checkpoint reaches the disk, and each is made atomic here:

* ``Trainer.save_checkpoint`` (every top-k checkpoint, and ``last.ckpt`` under ``save_last: true``) goes through the
  strategy's CheckpointIO plugin: :class:`AtomicCheckpointIO` writes ``torch.save``'s bytes into a temporary file
  beside the target, fsyncs it and renames it over the target (:func:`healthai.atomic.atomic_open`). Lightning's own
  ``TorchCheckpointIO`` writes through an fsspec transaction that does not fsync the file or its folder.
* ``save_last: "link"`` makes ``ModelCheckpoint`` remove ``last.ckpt`` and then link (or, where links are refused,
  copy) the newest checkpoint to it: between the two steps there is no ``last.ckpt``, and a failed copy leaves a torn
  one. :func:`atomic_link_checkpoint` builds the link (or the copy) under a temporary name and renames it over
  ``last.ckpt``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from healthai.atomic import atomic_open
from healthai.paths import naming


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable (see the module); remote paths (``s3://``...)
    keep Lightning's own writing, whose object stores are atomic by themselves."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # refuses storage_options, as Lightning does
            return
        # Serialised in memory first, as Lightning does: a failed write then raises the OSError (ENOSPC) itself, where
        # torch.save into the file would replace it with a RuntimeError from its zip writer.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with naming(path), atomic_open(path, "wb") as f:  # ENOSPC names no file; fit's one line must say which
            f.write(buffer.getbuffer())


def _is_local(path) -> bool:
    return "file" in (get_filesystem(path).protocol or ("file",))


def atomic_link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
    """``ModelCheckpoint._link_checkpoint`` made atomic: ``linkpath`` (``last.ckpt``) becomes a link to ``filepath``
    — or, where links are refused, a copy of it — under a temporary name, renamed over ``linkpath`` in one step."""
    if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
        folder = Path(linkpath).parent
        tmp = folder / f".{Path(linkpath).name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)  # left by a run of this pid that was killed here
        try:
            os.symlink(os.path.relpath(filepath, folder), tmp)
            os.replace(tmp, linkpath)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with naming(linkpath), open(filepath, "rb") as src, atomic_open(linkpath, "wb") as dst:
                shutil.copyfileobj(src, dst)
    trainer.strategy.barrier()


def make_checkpoints_atomic(trainer) -> None:
    """Give a fit's ``trainer`` the atomic checkpoint writing of this module: the CheckpointIO plugin, unless the user
    configured another one, and the atomic ``last.ckpt`` link on each ``ModelCheckpoint`` (set on the instance, so
    Lightning's class is left as it is)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint):
            callback._link_checkpoint = atomic_link_checkpoint
