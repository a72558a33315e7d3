"""Loading the base once per job under FSDP2 (#32 item 1): every rank builds the model on the meta device (no memory),
shards it, and rank 0 alone loads the weights and distributes them, each rank keeping only its shard.

Before this, every rank loaded the whole base into host memory before sharding it: a 2-rank CPU fit of a 774 MB base
raised each rank's peak RSS by 2.1x the base, so a 32B (65 GB) on an 8-GPU node needed ~1 TB of host memory. Now the
ranks after the first hold their shard plus one tensor in flight.

The distribution is torch's own ``set_model_state_dict(..., StateDictOptions(full_state_dict=True,
broadcast_from_rank0=True))``, as torchtune's FSDP2 recipes load their checkpoints: it broadcasts the full tensors one
at a time and keeps each rank's slice, assigning them to the meta parameters. What a state dict does not hold is
rebuilt here: the non-persistent buffers (RoPE's ``inv_freq``, computed in fp32 when a model is built, never saved)
are copied from rank 0's model, and rank 0's random-number state after building (the LoRA initialisation draws from
it) is given to every rank, as when each rank built its own copy.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

Build = Callable[[bool], torch.nn.Module]
"""``build(meta)``: the model (base and LoRA), on the meta device when ``meta`` (a skeleton: shapes, no weights), else
loaded for real."""


def loads_once(mesh) -> bool:
    """Whether the model sharded over ``mesh`` is built on the meta device and loaded on rank 0 only: a mesh of more
    than one rank (one rank would only add a copy)."""
    return mesh is not None and mesh.size() > 1 and dist.is_initialized()


def build_sharded(build: Build, shard: Callable[[torch.nn.Module], None], device: torch.device) -> torch.nn.Module:
    """The model of ``build``, sharded by ``shard`` (in place, e.g. :func:`healthai.sharding.shard_model`), with its
    weights loaded once, on global rank 0, and distributed: every rank builds a meta skeleton and shards it; rank 0
    then builds the real model, and each rank receives its shard of every weight, into memory allocated for the shards
    alone on ``device`` (this rank's: the process group's backend for it carries the weights).

    Collective: every rank of the default process group calls it. Rank 0 holds one full copy while it loads (freed
    before returning); the others never more than their shard and one tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # A skeleton draws no numbers, but rank 0's real build must draw what one process draws. An adapter applied to
        # it loads nothing into the meta tensors (rank 0's real build does), which torch warns of for every weight.
        warnings.filterwarnings("ignore", message=r".*copying from a non-meta parameter .* to a meta parameter")
        with torch.device("meta"):
            model = build(True)
    shard(model)
    rebuilt = sorted(non_persistent_buffers(model))  # their names: the values are rank 0's, sent below
    model.to_empty(device=device)  # each rank's shards only, uninitialised until the weights arrive
    full_state: dict[str, Any] = {}
    buffers: dict[str, torch.Tensor] = {}
    if dist.get_rank() == 0:
        full = build(False)
        full_state = full.state_dict()
        buffers = non_persistent_buffers(full)
        del full  # its tensors live on in full_state until they are sent
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    full_state.clear()
    buffers = broadcast_object(buffers)
    if sorted(buffers) != rebuilt:  # a buffer no state dict holds and rank 0 did not send would stay uninitialised
        raise RuntimeError(f"rank 0 sent the buffers {sorted(buffers)}, the model has {rebuilt}")
    set_buffers(model, buffers)
    torch.set_rng_state(broadcast_object(torch.get_rng_state()))
    return model


def non_persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s buffers that its state dict leaves out, by qualified name: what a meta build leaves empty. A few
    kilobytes (RoPE's ``inv_freq`` and ``original_inv_freq``)."""
    found = {}
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None:
                found[f"{prefix}.{name}" if prefix else name] = buffer.detach() if buffer.is_meta else buffer.cpu()
    return found


def set_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Put each of ``buffers`` (:func:`non_persistent_buffers` of an identical model) into ``model`` in place of its
    empty one, in the saved dtype (fp32 for RoPE), on the device of the model's parameters."""
    device = _parameter_device(model)
    for qualified, value in buffers.items():
        prefix, _, name = qualified.rpartition(".")
        module = model.get_submodule(prefix)
        module._buffers[name] = value.to(device)


def launched_rank() -> bool:
    """Whether this process is one rank of several started by a launcher (torchrun, srun, Lightning's launcher for
    the ranks after the first): its ``WORLD_SIZE`` says more than one, before any process group exists."""
    return int(os.environ.get("WORLD_SIZE") or 1) > 1


def on_rank_zero(compute: Callable[[], T]) -> T:
    """``compute()`` on global rank 0 only, its result given to every rank (collective: every rank calls it); in one
    process, or before a process group exists, simply ``compute()``. For work every rank needs the same answer to
    and that is costly to repeat, such as hashing the base for its fingerprint."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return compute()
    return broadcast_object(compute() if dist.get_rank() == 0 else None)


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a small picklable object)."""
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _parameter_device(model: torch.nn.Module) -> torch.device:
    from torch.distributed.tensor import DTensor

    param = next(model.parameters())
    return param.to_local().device if isinstance(param, DTensor) else param.device
