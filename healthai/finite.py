"""A run whose loss, gradient or weights turn non-finite stops, and leaves no adapter of NaNs (#29 item 5).

A learning rate far too high (or a record that overflows in fp16) turns the loss into ``inf``/``nan``; AdamW then
writes NaN into every LoRA weight, and fit used to go on, save that as ``adapter/`` and exit 0. Here the step is
checked before the optimizer takes it (:func:`check_step`, from ``on_before_optimizer_step``: the weights are still
the previous step's), and the adapter before it is written (:func:`check_weights`).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from healthai.errors import UserError

HINT = ("lower model.learning_rate (or look for records that overflow), then resume from an earlier checkpoint with "
        "--ckpt_path PATH")  # fmt: skip


class TrainingDiverged(UserError):
    """The loss, the gradient or the weights are not finite: the run stops without writing an adapter."""


def squared_norm(grads: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The squared L2 norm of ``grads`` (float64, on ``device``); of this rank's shard of each sharded (DTensor)
    gradient, so that summed over the ranks it is the whole gradient's."""
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    if not local:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64).to(device) for g in local])
    return norms.pow(2).sum()


def check_step(loss: float, grad_squared_norm: float, step: int) -> None:
    """Raise :class:`TrainingDiverged` naming optimizer step ``step`` (1-based) when the step's mean loss or its
    gradient's (squared) norm is not finite."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"train/loss is {loss} at optimizer step {step}: training diverged; the step was not "
                               f"taken and no adapter is written; {HINT}")  # fmt: skip
    if not math.isfinite(grad_squared_norm):
        norm = math.sqrt(grad_squared_norm) if grad_squared_norm > 0 else grad_squared_norm  # inf, or nan
        raise TrainingDiverged(f"the gradient norm is {norm} at optimizer step {step} (loss {loss:.4g}): training "
                               f"diverged; the step was not taken and no adapter is written; {HINT}")  # fmt: skip


def check_weights(state: Mapping[str, torch.Tensor], step: int) -> None:
    """Raise :class:`TrainingDiverged` when a weight of ``state`` (the adapter about to be written) is not finite."""
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise TrainingDiverged(f"the weights are not finite after optimizer step {step} (e.g. {name}): no adapter "
                                   f"is written; {HINT}")  # fmt: skip
