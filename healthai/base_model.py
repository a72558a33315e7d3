"""Building the trainable model: the base (dtype, attention kernel, 4-bit quantization, Liger kernels), its LoRA
adapter, merging it into the base for inference, gradient checkpointing and FSDP sharding.

This is the one module a new model family touches (its linear projections, a kernel patch, a quantization). Plain
functions with explicit arguments: :meth:`healthai.model.DiagnosisLoRA.configure_model` passes its hyperparameters in.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Optional

import torch

from healthai.adapter import Adapter

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The seven linear projections of every Qwen2 decoder layer."""

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def load_base(source: str, dtype: str, attn_implementation: str, *, quantization: Optional[str] = None,
              random_init: bool = False, liger_kernel: bool = False,
              device: Optional[torch.device] = None, meta: bool = False):  # fmt: skip
    """The transformers base from ``source`` (:func:`build_base`), patched with Liger's kernels if asked."""
    base = build_base(source, dtype, attn_implementation, quantization=quantization, random_init=random_init,
                      device=device, meta=meta)  # fmt: skip
    if liger_kernel:
        apply_liger_kernel(base)
    return base


def build_base(source: str, dtype: str, attn_implementation: str, *, quantization: Optional[str] = None,
               random_init: bool = False, device: Optional[torch.device] = None,
               meta: bool = False):  # fmt: skip
    """Load the base from ``source`` (a hub id or folder) in ``dtype`` (a :data:`DTYPES` name), or build it from its
    config with random weights (``random_init``); ``quantization="nf4"`` loads it in 4 bit (QLoRA) onto ``device``,
    this process's device. ``meta``: only its skeleton, built from its config on the meta device (no weight read, no
    memory), for :func:`healthai.sharded_load.build_sharded` to fill."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = DTYPES[dtype]
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), **kwargs)
    if random_init:
        # Lightning runs configure_model inside the strategy's init context (default device = the GPU), so the
        # weights are created straight on the device: no 15 GB CPU copy of a 7B model.
        config = AutoConfig.from_pretrained(source)
        return AutoModelForCausalLM.from_config(config, **kwargs)
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype,
            bnb_4bit_use_double_quant=True,
        )  # fmt: skip
        if device is not None and device.type == "cuda":
            # Each process's 4-bit base on its own GPU: without a device map every DDP rank would quantize onto
            # the current default GPU (rank 0's), and bitsandbytes weights cannot be moved afterwards. (On the CPU
            # the weights stay where they load, and transformers refuses a "cpu" map for 4-bit offloading.)
            kwargs["device_map"] = {"": str(device)}
    base = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    return base


def apply_lora(base, adapter: Optional[Adapter], r: int, alpha: int, dropout: float, target_modules: list[str],
               variant: str = "lora", init: str = "default"):  # fmt: skip
    """``base`` wrapped by PEFT: with ``adapter`` (an ``adapter/`` folder or a fit checkpoint ``.ckpt``) trainable,
    else with a new LoRA adapter of rank ``r`` on ``target_modules``, of ``variant`` (``lora``, ``dora``, ``rslora``)
    initialised by ``init`` (:mod:`healthai.lora_variants`; PiSSA and OLoRA rewrite the base weights)."""
    from peft import LoraConfig, get_peft_model

    from healthai.lora_variants import init_rng, lora_config_kwargs

    if adapter is not None:
        return adapter.apply(base, is_trainable=True)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type="CAUSAL_LM", **lora_config_kwargs(variant, init))  # fmt: skip
    if init == "pissa":  # a randomised SVD: the same on every rank and in every run
        with init_rng():
            return get_peft_model(base, config)
    return get_peft_model(base, config)


def is_lora(model) -> bool:
    """Whether ``model`` is a PEFT model (a LoRA built or applied), without importing peft: a zero-shot validate or
    predict never needs it, and importing it imports bitsandbytes too (seconds)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


SetAside = list[tuple[torch.nn.Module, str, torch.nn.Module]]
"""(parent module, attribute, LoRA layer) of each LoRA layer :func:`merge_lora` took out of the forward path."""


def merge_lora(model, keep_originals: bool = False) -> tuple[SetAside, list[torch.Tensor]]:
    """Fold the LoRA weights of ``model`` (a PEFT model) into its base weights and take each LoRA layer out of the
    forward path; returns what :func:`unmerge_lora` needs to put them back.

    PEFT's ``merge_adapter``, then each LoRA layer's merged base layer is put in its place (as ``merge_and_unload``
    does, but kept aside so that it can be undone): a merged PEFT layer still costs a Python call per projection and
    step, ~5 % of a decoding step of the small model at batch 1. ``keep_originals``: copy each base weight to the CPU
    first, so that :func:`unmerge_lora` puts the very bits back (PEFT's unmerge subtracts the update again, which in
    bf16 does not give the weights back exactly): what a validation in the middle of fit needs. The copies take host
    memory, not accelerator memory (the 7B's linear weights: ~13 GB)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, layer) for name, layer in model.named_modules() if isinstance(layer, BaseTunerLayer)]
    originals = [layer.get_base_layer().weight.detach().to("cpu", copy=True) for _, layer in layers] if keep_originals \
        else []  # fmt: skip
    model.merge_adapter()
    set_aside = []
    for name, layer in layers:
        parent, _, attr = name.rpartition(".")
        set_aside.append((model.get_submodule(parent), attr, layer))
        setattr(set_aside[-1][0], attr, layer.get_base_layer())
    return set_aside, originals


def unmerge_lora(model, set_aside: SetAside, originals: Optional[list[torch.Tensor]] = None) -> None:
    """Undo :func:`merge_lora` (nothing when ``set_aside`` is empty): the LoRA layers back in place, and the base
    weights copied back from ``originals`` where it kept them (bit for bit), else PEFT's unmerge (exact in fp32 only
    up to rounding, in bf16 not at all)."""
    if not set_aside:
        return
    for parent, attr, layer in set_aside:
        setattr(parent, attr, layer)
    if not originals:
        model.unmerge_adapter()
        return
    with torch.no_grad():
        for (_, _, layer), weight in zip(set_aside, originals):
            layer.get_base_layer().weight.copy_(weight)
            layer.merged_adapters = []  # PEFT's own record of what is merged: nothing now


FloatBuffers = list[tuple[torch.nn.Module, str, torch.Tensor]]
"""Each non-persistent floating buffer of a model: its module, its name and a copy of its value as built."""


def float_buffers(model: torch.nn.Module) -> FloatBuffers:
    """Copies of ``model``'s non-persistent floating buffers (RoPE's ``inv_freq``: computed in fp32 when the model is
    built, never saved), taken before anything casts the module. A few kilobytes."""
    saved = []
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_floating_point():
                saved.append((module, name, buffer.detach().clone()))
    return saved


def restore_float_buffers(saved: FloatBuffers) -> int:
    """Put back each buffer of :func:`float_buffers` whose dtype a whole-module cast changed (Lightning's
    ``bf16-true``/``16-true`` precision casts every floating tensor, so RoPE's frequencies would be rounded to bf16
    and predict's answers would drift from validate's and serve's). The saved value, not the cast one cast back: the
    bits lost are not recovered by casting again. Returns how many were restored (0 where nothing was cast)."""
    restored = 0
    for module, name, value in saved:
        current = module._buffers.get(name)
        if current is not None and current.dtype != value.dtype:
            module._buffers[name] = value.to(current.device)
            restored += 1
    return restored


def enable_gradient_checkpointing(model) -> None:
    """Recompute the base's activations in backward (non-reentrant) under the PEFT ``model``."""
    base = model.get_base_model()  # the transformers model, LoRA layers injected in place
    # Non-reentrant checkpointing works with frozen inputs and PEFT. transformers 5 renamed the method (the old name
    # is a deprecated alias there); 4.x has only the old one.
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Inputs must require grad so that checkpointed segments of a frozen base still back-propagate to LoRA.
    model.enable_input_require_grads()


def prepare_for_training(model, gradient_checkpointing: bool, mesh=None, precision: Optional[str] = None,
                         verbose: bool = True) -> None:  # fmt: skip
    """Put the PEFT ``model`` in train mode with gradient checkpointing if asked, say how many weights train
    (``verbose``: rank zero), and shard it over ``mesh`` (a data-parallel device mesh of
    :class:`healthai.sharding.LoRAFSDPStrategy`; FSDP2, one unit per decoder layer, parameters in the trainer's
    ``precision``) when there is one."""
    model.train()  # from_pretrained returns eval mode; LoRA dropout must be live in fit
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if verbose:
        model.print_trainable_parameters()
    if mesh is not None:
        from healthai.sharding import shard_model

        shard_model(model, mesh, precision)


def check_liger_kernel() -> None:
    """Raise ValueError (one line naming the option) where ``liger_kernel`` cannot work: no CUDA, or no package."""
    if not torch.cuda.is_available():
        raise ValueError("--model.liger_kernel true needs a CUDA GPU (Liger's kernels are Triton GPU kernels), and "
                         "this machine has none; drop the option")  # fmt: skip
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("--model.liger_kernel true needs the liger-kernel package: pip install -e '.[gpu]'")


def apply_liger_kernel(base) -> None:
    """Patch a Qwen2 base in place with Liger's RoPE, RMSNorm and SwiGLU kernels, before LoRA wraps its projections
    (Liger's SwiGLU calls ``gate_proj``/``up_proj``/``down_proj``, so the LoRA layers put there later still run).
    Liger's cross-entropy kernels are left off: the loss is :meth:`healthai.model.DiagnosisLoRA.answer_loss`."""
    model_type = base.config.model_type
    if model_type != "qwen2":
        raise ValueError(f"--model.liger_kernel true supports Qwen2 (Qwen2.5) bases; this base is {model_type!r}")
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2

    apply_liger_kernel_to_qwen2(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=base
    )
