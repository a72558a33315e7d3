"""LoRA variants (DoRA, rsLoRA), initialisations (Gaussian, PiSSA, OLoRA) and NEFTune: the options of
:class:`healthai.model.DiagnosisLoRA` that PEFT and a forward hook implement, and what this project adds around them.

* ``lora_variant``: ``dora`` (PEFT ``use_dora``: the update of each weight split into a trained magnitude per output
  row and a LoRA-updated direction) or ``rslora`` (PEFT ``use_rslora``: scaling ``alpha / sqrt(r)`` instead of
  ``alpha / r``). Both are recorded in PEFT's ``adapter_config.json``, so predict, serve and export apply them.
* ``lora_init``: ``gaussian`` (A drawn from N(0, 1/r), B zero), ``pissa`` (A, B from the base weight's top-r singular
  vectors; PEFT's ``pissa_niter_4``, see :data:`PEFT_INIT`) or ``olora`` (from its QR decomposition). PiSSA and OLoRA
  *move* the top-r part out of the base weight into the adapter (``W_res = W - s B0 A0``): a model trained that way is
  ``W_res + s B A``, and the trained A, B alone mean nothing on the original base that predict loads. So the saved
  adapter is the trained one converted, as PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``
  converts it (``LoraModel.subtract_mutated_init``): ``W + s (B A - B0 A0)`` is a plain LoRA of rank ``2r`` with
  ``A' = [A; A0]``, ``B' = [B, -B0]`` and the same scaling, which applies to the unmodified base (:func:`convert`).
  The initial ``A0, B0`` are kept with the run (in every ``.ckpt``) for that, and a resume puts back the checkpoint's
  own ``W_res`` (:func:`rebase`), whatever SVD the resuming machine computes.
* ``neftune_alpha``: uniform noise on the input embeddings in training forwards only (:func:`neftune_hook`).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, get_args

import torch

from healthai.errors import ConfigError

LoraVariant = Literal["lora", "dora", "rslora"]
LoraInit = Literal["default", "gaussian", "pissa", "olora"]

PEFT_INIT: dict[str, Any] = {"default": True, "gaussian": "gaussian", "pissa": "pissa_niter_4", "olora": "olora"}
"""``LoraConfig.init_lora_weights`` of each ``lora_init``. PiSSA is PEFT's fast randomised SVD with 4 subspace
iterations (the PiSSA authors' recommended setting): an exact SVD of one 3584x18944 projection of the 7B takes ~42 s on
2 CPU cores (~1 h for the whole model, which loads onto the CPU), the randomised one 0.3 s."""

MOVES_BASE = ("pissa", "olora")
"""Initialisations that rewrite the base weights (``W_res = W - s B0 A0``)."""

INIT_SEED = 0
"""Seed of PiSSA's randomised SVD: every rank of a run, and every run, starts from the same ``W_res`` and A0, B0."""


def lora_config_kwargs(variant: str, init: str) -> dict[str, Any]:
    """``LoraConfig`` arguments of a ``lora_variant`` and a ``lora_init``."""
    return {"use_dora": variant == "dora", "use_rslora": variant == "rslora", "init_lora_weights": PEFT_INIT[init]}


def variant_of(config) -> str:
    """The ``lora_variant`` a PEFT ``LoraConfig`` has."""
    return "dora" if config.use_dora else "rslora" if config.use_rslora else "lora"


def init_of(config) -> str:
    """The ``lora_init`` a PEFT ``LoraConfig`` was made with (``random`` for PEFT's ``False``, used by tests)."""
    init = config.init_lora_weights
    if init is True:
        return "default"
    if init is False:
        return "random"
    return "pissa" if str(init).startswith("pissa") else str(init)


def check_lora_options(variant: str, init: str, quantization: Optional[str], adapter_path: Optional[str]) -> None:
    """Refuse (:class:`ConfigError`, one line naming the option) a variant or initialisation that cannot run with the
    other settings. With ``adapter_path`` the adapter's own configuration decides (as it does for ``lora_r``), and its
    weights are the initialisation, so ``lora_init`` does not apply."""
    for option, value, kind in (("lora_variant", variant, LoraVariant), ("lora_init", init, LoraInit)):
        if value not in get_args(kind):
            raise ConfigError(f"model.{option}: {value!r} is not one of {', '.join(get_args(kind))}")
    if adapter_path is not None or init not in MOVES_BASE:
        return
    if quantization is not None:
        raise ConfigError(f"model.lora_init {init} cannot start from a {quantization} base (model.quantization): it "
                          "rewrites the base weights, which a 4-bit base cannot hold exactly, and the adapter would "
                          "no longer apply to the original base; use lora_init default or gaussian with "
                          "QLoRA")  # fmt: skip
    if variant == "dora":
        raise ConfigError(f"model.lora_init {init} with model.lora_variant dora cannot be saved as an adapter of the "
                          "unmodified base (DoRA's magnitudes are taken from the rewritten weights); use one of the "
                          "two")  # fmt: skip


@contextmanager
def init_rng() -> Iterator[None]:
    """A block in which PiSSA's randomised SVD draws from :data:`INIT_SEED`, the caller's random state kept."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(INIT_SEED)
        yield


# -- PiSSA / OLoRA: the initial adapter, the conversion, the resume ---------------------------------------------------


def initial_weights(peft_model) -> dict[str, torch.Tensor]:
    """The initial A0, B0 of every LoRA layer (CPU copies, by parameter name), taken right after ``get_peft_model``."""
    return {name: p.detach().to("cpu", copy=True) for name, p in peft_model.named_parameters()
            if ".lora_A." in name or ".lora_B." in name}  # fmt: skip


def convert(weights: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained PiSSA/OLoRA weights as the plain rank-2r LoRA of the unmodified base (``A' = [A; A0]``,
    ``B' = [B, -B0]``: ``B' A' = B A - B0 A0``). ``initial`` has the keys of ``weights``' LoRA entries."""
    out = {}
    for name, value in weights.items():
        if ".lora_A." in name:
            out[name] = torch.cat([value, initial[name].to(value)], dim=0)
        elif ".lora_B." in name:
            out[name] = torch.cat([value, -initial[name].to(value)], dim=1)
        else:
            out[name] = value
    return out


def converted_settings(r: int, alpha: float, variant: str) -> tuple[int, float]:
    """Rank and alpha of the converted adapter: twice the rank, the same scaling (``alpha / r``, or
    ``alpha / sqrt(r)`` for rsLoRA)."""
    return 2 * r, alpha * (math.sqrt(2) if variant == "rslora" else 2)


def convert_saved(directory: Path, initial: dict[str, torch.Tensor]) -> None:
    """Rewrite a PEFT adapter folder written from a PiSSA/OLoRA model (its ``adapter_model.safetensors`` and
    ``adapter_config.json``) as the converted plain LoRA (:func:`convert`), which PEFT applies to the original base."""
    from safetensors.torch import load_file, save_file

    weights_file, config_file = directory / "adapter_model.safetensors", directory / "adapter_config.json"
    saved = load_file(weights_file)
    by_saved_name = {name.replace(".default.", "."): value for name, value in initial.items()}  # PEFT's file names
    save_file(convert(saved, by_saved_name), weights_file, metadata={"format": "pt"})
    config = json.loads(config_file.read_text(encoding="utf-8"))
    variant = "rslora" if config.get("use_rslora") else "lora"
    config["r"], config["lora_alpha"] = converted_settings(config["r"], config["lora_alpha"], variant)
    config["init_lora_weights"] = True
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@torch.no_grad()
def rebase(peft_model, now: dict[str, torch.Tensor], recorded: dict[str, torch.Tensor]) -> None:
    """Turn the ``W_res`` this run's initialisation computed (from A0, B0 = ``now``) into the one of the run that
    wrote a checkpoint (``recorded``): ``W_res += s (B0_now A0_now - B0_rec A0_rec)`` in every LoRA layer. Without
    this a resume would continue on another residual (a randomised or differently rounded SVD)."""
    from peft.tuners.lora import LoraLayer

    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter, scaling in layer.scaling.items():
            a, b = f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
            if a not in recorded or b not in recorded:
                raise KeyError(f"no initial weights recorded for {a}")
            weight = layer.get_base_layer().weight
            delta = now[b].float() @ now[a].float() - recorded[b].float() @ recorded[a].float()
            if layer.fan_in_fan_out:
                delta = delta.T
            weight.copy_((weight.float() + scaling * delta.to(weight.device)).to(weight.dtype))


# -- NEFTune ----------------------------------------------------------------------------------------------------------


def neftune_hook(alpha: float):
    """A forward hook for the input embeddings (Jain et al. 2023, as transformers' ``neftune_post_forward_hook``):
    while the module is in training mode, add uniform noise in ``±alpha / sqrt(L * d)`` (``L`` the batch's sequence
    length, padding included, ``d`` the hidden size); in eval mode (validation, generation) the output is untouched."""

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        magnitude = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.zeros_like(output).uniform_(-magnitude, magnitude)

    return hook
