"""Generation from an FSDP2-sharded model with one gather per ``generate`` call, not one per decoding step (#30 item 3).

Training shards the model so that each decoder layer is gathered just before it runs and freed after
(:func:`healthai.sharding.shard_model`). ``generate`` runs the model once per new token: left as it is, every step
would all-gather every layer again (a 32B model: ~64 GB per token per rank) and every rank would have to keep stepping
until the slowest rank's answers are done (``synced_gpus``). :func:`gathered_for_generation` turns resharding after
forward off for the call: the first forward (the prompt) gathers each unit once, the decoding steps reuse the full
weights with no collective at all, and the units are sharded again when the call ends. The ranks meet at the next
gather (the next call's prompt forward, or the training step after validation), so they need no per-step
``synced_gpus`` handshake either.

The price is memory: during the call every rank holds the whole model (bf16 under ``bf16-mixed``), as a one-GPU run
does, next to its shards. Fit's sanity check runs its generation memory probe under the same gather
(:func:`healthai.val_generation.probe_generation_memory`), so a card too small for it fails in the first minute.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from healthai.sharding import is_sharded, reshard_all


def reshards_after_forward(unit: torch.nn.Module) -> bool:
    """Whether the FSDP unit ``unit`` frees its gathered parameters after each forward. FSDP2 has a setter
    (``set_reshard_after_forward``) but no getter: read it from the unit's parameter groups."""
    groups = unit._get_fsdp_state()._fsdp_param_groups
    return any(group._reshard_after_forward for group in groups)


@contextmanager
def gathered_for_generation(module: torch.nn.Module) -> Iterator[bool]:
    """For the block, every FSDP unit inside ``module`` keeps its parameters gathered after a forward; afterwards each
    unit's own setting is restored and every unit is sharded again. Yields whether ``module`` is sharded at all (False:
    nothing is changed). Every rank must enter it and run the same number of first forwards (one ``generate`` call)."""
    units = [m for m in module.modules() if is_sharded(m)]
    if not units:
        yield False
        return
    resharding = [unit for unit in units if reshards_after_forward(unit)]
    for unit in resharding:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield True
    finally:
        for unit in resharding:
            unit.set_reshard_after_forward(True, recurse=False)
        reshard_all(module)  # free the full weights now, not at the next training forward
