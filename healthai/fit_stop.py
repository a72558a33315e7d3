"""``fit`` stopped by SIGTERM (a scheduler's or a spot instance's stop) or Ctrl+C: a resumable ``last.ckpt`` at the
step reached, the command that resumes it, exit status 143 / 130 — as predict and label stop (#29 item 4).

Lightning's own SIGTERM handling raises ``SIGTERMException`` (a ``SystemExit`` with status 0) at the next batch's end
without a checkpoint, and Ctrl+C is a ``KeyboardInterrupt`` anywhere in a step, exit 1. :class:`StopAtStep` replaces
both for the training loop: a signal only marks the run, and it stops after the optimizer step under way — never
inside an accumulation window, whose partial gradient no checkpoint holds — where :class:`ModelCheckpoint` saves its
``every_n_train_steps`` checkpoints, so ``--ckpt_path last`` resumes at the exact batch (tests/test_fit_resume.py).
Under DDP/FSDP the mark is max-reduced over the ranks before each optimizer step, so every rank stops (and takes part
in the checkpoint's collective save) at the same step, even when only one process got the signal. A second Ctrl+C
interrupts at once. SLURM's requeue signal stays Lightning's (``SLURMEnvironment(auto_requeue=True)``, its default
under SLURM: an ``hpc_ckpt`` and ``scontrol requeue``, restored by the requeued job).
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from healthai.argv import command_without

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
"""Exit status after a stop signal: 128 + the signal's number, as a shell reports a process that signal ended."""


STOPPED_BEFORE_A_STEP = ("fit: stopped by SIGTERM before this run's first optimizer step: nothing new to save; rerun "
                         "the same command to start (or resume) again")  # fmt: skip
"""What fit says when SIGTERM came before its training loop (a checkpoint it resumed from is still there)."""


class StopAtStep(Callback):
    """Stop fit after the optimizer step under way when SIGTERM or SIGINT arrives: save ``last.ckpt``, say how to
    resume, exit 143 / 130. Added by the CLI to every ``fit`` (:class:`healthai.cli.HealthAICLI`)."""

    def __init__(self) -> None:
        self._signal: Optional[int] = None  # the signal this process received
        self._stop: Optional[int] = None  # the signal every rank stops for, after the step under way
        self._step_before = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registered its SIGTERM handler before the loop (and puts the handlers it found back at its
        # teardown, ours included); signals can only be handled in the main thread.
        self._signal = self._stop = None
        if trainer.received_sigterm:  # to Lightning's handler, in the sanity check: the CLI says so and exits 143
            raise SIGTERMException()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signal = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl+C interrupts at once
        print(f"\n{signal.Signals(signum).name}: finishing the optimizer step under way, then saving last.ckpt"
              + (" (press Ctrl+C again to stop at once)" if signum == signal.SIGINT else ""),
              file=sys.stderr, flush=True)  # fmt: skip

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        self._step_before = trainer.global_step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        """The ranks agree whether to stop after this step (the largest signal number any of them received)."""
        mark = self._signal or 0
        if trainer.world_size > 1:
            flag = torch.tensor(mark, device=pl_module.device)
            mark = int(trainer.strategy.reduce(flag, reduce_op=torch.distributed.ReduceOp.MAX))
        self._stop = mark or None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if self._stop is None or trainer.global_step == self._step_before:  # mid-window: the step is not done yet
            return
        signum, step = self._stop, trainer.global_step
        path, by_name = last_checkpoint_path(trainer)
        if path.is_symlink():  # ModelCheckpoint(save_last="link"): replace the link, not the file it points to
            path.unlink()
        trainer.save_checkpoint(path)  # collective: every rank is here, at this step
        if trainer.is_global_zero:
            how = resume_command("last" if by_name else str(path))
            print(f"fit: stopped by {signal.Signals(signum).name} after optimizer step {step}: saved {path}; to "
                  f"resume: {how}", file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(EXIT_CODES[signum])


def last_checkpoint_path(trainer: L.Trainer) -> tuple[Path, bool]:
    """Where the stop's checkpoint goes, and whether ``--ckpt_path last`` finds it there: the ``last.ckpt`` of the
    ModelCheckpoint that keeps one (else of the first with a folder); ``<default_root_dir>/last.ckpt`` without one."""
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    keeping = [cb for cb in callbacks if cb.save_last] or callbacks
    if keeping:
        cb = keeping[0]
        return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}", True
    return Path(trainer.default_root_dir) / "last.ckpt", False


def resume_command(ckpt: str, argv: Optional[list[str]] = None) -> str:
    """This process's command line with ``--ckpt_path ckpt`` in place of any it had, as the user can paste it."""
    return shlex.join([*command_without("--ckpt_path", argv), "--ckpt_path", ckpt])
