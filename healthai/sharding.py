"""Fully sharded LoRA training with FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's
``ModelParallelStrategy``: how the model is sharded, and checkpoints that hold only the adapter.

Why FSDP2 and not Lightning's ``FSDPStrategy`` (FSDP1): PEFT keeps the LoRA weights in fp32 next to a bf16 base, and
FSDP1 flattens each unit into one tensor of one dtype (it refuses the mix); its bf16 policy also casts buffers (RoPE's
``inv_freq``) and reduces gradients in bf16, and Lightning's FSDP1 precision plugin refuses ``gradient_clip_val``.
FSDP2 shards every parameter on its own (a ``DTensor`` of its own dtype), casts parameters, not buffers, for compute
(:func:`mixed_precision_policy`), reduces in fp32, and ``torch.nn.utils.clip_grad_norm_`` computes the norm of the
whole sharded gradient. It runs on CPU with gloo too, so a multi-GPU config can be smoke-tested on a laptop.

The layout follows torchtune's and litgpt's LoRA recipes: each decoder layer is its own unit (gathered just before it
runs, freed after), then the LM head and the decoder (embeddings, final norm) (:func:`shard_model`).
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy

from healthai.errors import ConfigError

SUPPORTED_PRECISION = ("32-true", "bf16-mixed")
"""Trainer precisions the sharded path supports. ``bf16-true``/``16-true`` would cast the fp32 LoRA weights, their
optimizer state and RoPE's buffers to half precision."""


def mixed_precision_policy(precision: str):
    """FSDP2's policy for the trainer's ``precision``: under ``bf16-mixed`` parameters are gathered and computed in
    bf16 while the sharded LoRA weights (and so AdamW's state) stay fp32 and gradients are reduced in fp32; buffers
    are never cast. ``32-true`` computes and reduces in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision not in SUPPORTED_PRECISION:
        raise ConfigError(f"trainer.precision {precision!r} is not supported with {LoRAFSDPStrategy.__name__}: use "
                          f"one of {', '.join(SUPPORTED_PRECISION)} (bf16-mixed on GPUs)")  # fmt: skip
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_units(base: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of a transformers model that become their own FSDP unit: the transformer blocks, found as
    transformers' own split units (``_no_split_modules``: ``Qwen2DecoderLayer`` for Qwen2), in model order."""
    names = set(getattr(base, "_no_split_modules", None) or [])
    units = [m for m in base.modules() if type(m).__name__ in names]
    if not units:
        raise ValueError(f"no decoder layers found to shard in {type(base).__name__} (_no_split_modules={names})")
    return units


def shard_model(model: torch.nn.Module, mesh, precision: str) -> None:
    """Apply ``fully_shard`` in place to the transformers model inside ``model`` (a PEFT model): each decoder layer,
    the LM head (unless tied to the embeddings), then the decoder (embeddings and final norm).

    The decoder, not the whole model, is the root: the training loss runs the decoder and then the frozen head's
    weight in chunks (:meth:`DiagnosisLoRA.answer_loss`), so the head is gathered explicitly there
    (:func:`gathered_head`); ``generate`` calls both as modules, whose hooks gather them.
    """
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_policy(precision)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    units = shard_units(base)
    for i, unit in enumerate(units):
        # The last layer's parameters are needed again at once by the backward: keeping them gathered saves a gather.
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(units) - 1)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if head.weight is not decoder.get_input_embeddings().weight:  # tied (small Qwen2.5): one parameter, one unit
        fully_shard(head, mesh=mesh, mp_policy=policy)
    fully_shard(decoder, mesh=mesh, mp_policy=policy)


@contextmanager
def gathered_head(base: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The LM head of ``base`` with its full weight for the duration of the block (all-gathered when sharded, then
    sharded again): for code that uses ``head.weight`` directly instead of calling the module."""
    head = base.get_output_embeddings()
    owner = head if is_sharded(head) else base.get_decoder()
    if not is_sharded(owner):
        yield head
        return
    owner.unshard()
    try:
        yield head
    finally:
        owner.reshard()


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard_all(module: torch.nn.Module) -> None:
    """Put every FSDP unit inside ``module`` back in its sharded state. A root unit stays gathered after a forward
    that has no backward (validation, generation), and then holds the full tensors: its ``named_parameters`` are not
    the sharded parameters the optimizer holds, and the memory is not freed."""
    for unit in module.modules():
        if is_sharded(unit):
            unit.reshard()


def synced_generation(module: torch.nn.Module) -> Optional[bool]:
    """``generate(synced_gpus=...)`` for ``module``: True when it is sharded across several ranks (each decoding step
    gathers every layer from all ranks, so a rank whose answers are done must go on stepping until every rank's are;
    transformers recognises FSDP1 and DeepSpeed by itself, not FSDP2), else None (transformers decides)."""
    several = torch.distributed.is_available() and torch.distributed.is_initialized()
    sharded = several and torch.distributed.get_world_size() > 1 and any(map(is_sharded, module.modules()))
    return True if sharded else None


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters of ``module`` as full CPU tensors, on global rank zero (empty elsewhere).

    Collective under FSDP2: every rank must call it; each sharded parameter is gathered on its own. Only these few MB
    are gathered: the frozen base is never assembled (``get_model_state_dict(full_state_dict=True)`` would gather all
    of it, for every checkpoint, only to throw it away).
    """
    from torch.distributed.tensor import DTensor

    rank_zero = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    state = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        if rank_zero:
            state[name] = full.detach().cpu().clone()
    return state


@torch.no_grad()
def load_trainable_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into ``module``'s trainable parameters of the same names (each rank keeps its own shard of
    each); other names are left alone. Every rank must pass the same ``state``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, param in module.named_parameters():
        if not param.requires_grad or name not in state:
            continue
        value = state[name].to(device=param.device, dtype=param.dtype)
        if isinstance(param, DTensor):
            value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(value)
        else:
            param.data.copy_(value)


def evaluate_under_no_grad(trainer) -> None:
    """Run ``trainer``'s validate, test and predict loops under ``torch.no_grad`` rather than ``inference_mode``
    (#30 item 8): FSDP2's unshard may not support inference tensors; Lightning does this for its FSDP1 strategy only
    (``_no_grad_context``), not for ``ModelParallelStrategy``. Fit's own validation already runs under ``no_grad``."""
    for loop in (trainer.validate_loop, trainer.test_loop, trainer.predict_loop):
        loop.inference_mode = False


class LoRAFSDPStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` set up for fully sharded LoRA: every process is one data-parallel shard
    (no tensor parallelism), the model is sharded by ``DiagnosisLoRA.configure_model`` (:func:`shard_model`), and a
    checkpoint is one ``.ckpt`` file with the LoRA weights and their optimizer state only, gathered on rank zero — the
    same file as on one device, which predict and export take as an adapter and ``fit --ckpt_path`` resumes from.

    Args:
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPU (the default picks by device).
        timeout: Timeout of the collectives.
    """

    def __init__(self, process_group_backend: Optional[str] = None, timeout: Optional[timedelta] = default_pg_timeout):
        super().__init__(save_distributed_checkpoint=False, process_group_backend=process_group_backend,
                         timeout=timeout)  # fmt: skip

    def setup(self, trainer) -> None:
        evaluate_under_no_grad(trainer)  # standalone validate / predict: FSDP2 under no_grad, not inference_mode
        super().setup(trainer)

    def setup_environment(self) -> None:
        if getattr(self.lightning_module.hparams, "quantization", None):  # before any process group or weights
            raise ConfigError("model.quantization (QLoRA) cannot be sharded by healthai.sharding.LoRAFSDPStrategy: "
                              "shard a bf16 base (a lora.yaml config with configs/qwen_lora_fsdp.yaml), or run QLoRA "
                              "on one GPU or with DDP")  # fmt: skip
        hp = self.lightning_module.hparams
        init = getattr(hp, "lora_init", "default")
        if init in ("pissa", "olora") and getattr(hp, "adapter_path", None) is None:
            raise ConfigError(f"model.lora_init {init} is not supported with healthai.sharding.LoRAFSDPStrategy (its "
                              "rewrite of the base weights and the conversion of the saved adapter are not verified "
                              "on sharded weights); use lora_init default or gaussian, or train on one GPU or with "
                              "DDP")  # fmt: skip
        # All processes of all nodes form one data-parallel (FSDP) dimension; the tensor-parallel one has size 1.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def on_validation_end(self) -> None:
        reshard_all(self.lightning_module)  # free what validation's forwards left gathered (see reshard_all)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        reshard_all(self.lightning_module)
        return trainable_state_dict(self.lightning_module)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The optimizer's full state on rank zero (empty elsewhere), keyed by position as a plain run saves it, so a
        checkpoint is the same file whichever strategy wrote it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        reshard_all(self.lightning_module)  # the optimizer's parameters are the sharded ones
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, optimizer, options=options)
        if self.global_rank != 0:
            return {}
        names = [name for group in state["param_groups"] for name in group["params"]]
        position = {name: i for i, name in enumerate(names)}
        return {"state": {position[name]: value for name, value in state["state"].items()},
                "param_groups": [{**group, "params": [position[n] for n in group["params"]]}
                                 for group in state["param_groups"]]}  # fmt: skip

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Read the (adapter-only, small) ``.ckpt`` on every rank and put its LoRA weights and optimizer state into
        the shards. The returned checkpoint keeps its ``state_dict`` for the module's ``on_load_checkpoint``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        path = Path(self.broadcast(checkpoint_path))
        checkpoint = torch.load(path, map_location="cpu", weights_only=bool(weights_only))  # as Lightning: None = False
        reshard_all(self.lightning_module)  # the parameters to fill are the sharded ones
        load_trainable_state_dict(self.lightning_module, checkpoint["state_dict"])
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):  # none outside fit
            optimizer = getattr(optimizer, "_optimizer", optimizer)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=_by_name(state, self.model, optimizer),
                                     options=options)  # fmt: skip
        return checkpoint


def _by_name(state: dict[str, Any], module: torch.nn.Module, optimizer) -> dict[str, Any]:
    """An optimizer state keyed by position in ``optimizer`` (as saved) keyed by ``module``'s parameter names instead,
    as ``set_optimizer_state_dict`` expects a full state."""
    name_of = {id(param): name for name, param in module.named_parameters()}
    names = [name_of[id(param)] for group in optimizer.param_groups for param in group["params"]]
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]]}  # fmt: skip
