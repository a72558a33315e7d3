"""How :class:`healthai.model.DiagnosisLoRA` builds its model — the base (read once per job under FSDP), its LoRA (an
adapter's, or a new one of the LoRA options), checkpointing, sharding, PiSSA / OLoRA's initial weights, NEFTune — and
the base record its checks and checkpoints name. A mixin of the LightningModule, kept apart from its training and
checkpoint hooks (``healthai/model.py``) and its generation (``healthai/model_generation.py``)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from healthai.adapter import resolve_base
from healthai.base_model import apply_lora, is_lora, load_base
from healthai.base_model import float_buffers, prepare_for_training, restore_float_buffers
from healthai.sharded_load import build_sharded, loads_once, on_rank_zero


class ModelBuilding:
    """The model-building half of :class:`~healthai.model.DiagnosisLoRA` (its ``hparams``, ``adapter`` and trainer)."""

    # -- building the model -------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the base, apply LoRA (where :meth:`builds_lora`) and set up checkpointing, and shard the model under a
        ``ModelParallelStrategy`` (:mod:`healthai.base_model`). Lightning calls this on the target device before a
        checkpoint is restored (so ``fit --ckpt_path`` finds the adapter's parameters in place)."""
        if self.model is not None:
            return
        hp = self.hparams
        self._record_base()
        self.tokenizer = self._tokenizer()
        # healthai.sharding.LoRAFSDPStrategy gives a device mesh; other strategies none.
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        precision = str(self.trainer.precision) if mesh is not None else None
        # How many weights train is fit's business (rank zero says it); validate, predict and serve train none.
        verbose = self.global_rank == 0 and self._fitting()
        if loads_once(mesh) and not hp.random_init:  # random weights are drawn on each rank's device instead
            self._build_sharded_once(mesh, precision, verbose)
            return
        base = self._load_base()
        self._float_buffers = float_buffers(base)  # before Lightning's precision plugin casts the module
        if not self.builds_lora():
            self.model = base  # zero-shot validate or predict: the transformers model alone
            return
        self._wrap_in_lora(base)
        prepare_for_training(self.model, hp.gradient_checkpointing, mesh, precision, verbose=verbose)

    def _build_sharded_once(self, mesh, precision: str, verbose: bool) -> None:
        """Under FSDP on several ranks: the base read on rank 0 only and each rank given its shard
        (:func:`healthai.sharded_load.build_sharded`), not a full copy per rank before sharding."""
        hp = self.hparams

        def build(meta: bool):
            self._wrap_in_lora(self._load_base(meta=meta))
            return self.model

        def shard(model) -> None:
            prepare_for_training(model, hp.gradient_checkpointing, mesh, precision, verbose=verbose)

        self.model = build_sharded(build, shard, self.trainer.strategy.root_device)
        self._float_buffers = float_buffers(self.base_model)  # fp32 as rank 0 built them

    def _record_base(self) -> None:
        """Under a Trainer, before the base loads: its fingerprint, once per job (:meth:`base_record`) where something
        records it (fit's checkpoints, predict's meta file) or an adapter is checked against it — the check deferred
        to here on launched ranks (``__init__``). The same decision on every rank: the first call is collective."""
        from lightning.pytorch.trainer.states import TrainerFn

        if self._trainer is None:
            return
        records = self._trainer.state.fn in (TrainerFn.FITTING, TrainerFn.PREDICTING)
        if records or (self.adapter is not None and not self.hparams.random_init):
            record = self.base_record()
            if not self._base_checked:
                self._check_base(self.hparams.allow_base_mismatch, record["fingerprint"])
                self._base_checked = True

    def builds_lora(self) -> bool:
        """Whether :meth:`configure_model` wraps the base in a PEFT LoRA: to apply ``adapter_path``, or to train a new
        one in fit. validate and predict without an adapter (zero-shot) run the transformers model alone. A new LoRA
        starts as the identity (its B is zero), so it would only add its layers' calls, and PEFT and bitsandbytes
        imports of several seconds. (A ``--ckpt_path`` checkpoint still gets its LoRA: :meth:`on_load_checkpoint`.)
        A module outside a Trainer (tests, benchmarks, serve) and a sharded one are built as fit builds them."""
        if self.adapter is not None or self._trainer is None or self.device_mesh is not None:
            return True
        return self._fitting()

    def _fitting(self) -> bool:
        """Whether this module runs under ``Trainer.fit`` (its LoRA trains)."""
        from lightning.pytorch.trainer.states import TrainerFn

        return self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING

    def _wrap_in_lora(self, base) -> None:
        """``self.model``: ``base`` with ``adapter_path``'s LoRA applied, or with a new one of the LoRA options."""
        hp = self.hparams
        self.model = apply_lora(base, self.adapter, hp.lora_r, hp.lora_alpha, hp.lora_dropout, hp.target_modules,
                                hp.lora_variant, hp.lora_init)  # fmt: skip
        self._keep_initial_lora()

    def _tokenizer(self):
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "tokenizer", None) is not None:
            return datamodule.tokenizer
        from transformers import AutoTokenizer

        base = self._base_source()
        return AutoTokenizer.from_pretrained(self.adapter.tokenizer_source(base) if self.adapter is not None else base)

    def _check_base(self, allow_mismatch: bool, fingerprint: Optional[str] = None) -> None:
        """Refuse an adapter trained on another base, before anything is loaded or written (every rank); against
        ``fingerprint`` when given (rank 0's), else the base's own."""
        self.adapter.check_base(self._base_source(), allow_mismatch, "--model.allow_base_mismatch",
                                fingerprint=fingerprint)  # fmt: skip

    def _base_source(self) -> str:
        """Where the base is loaded from: ``model_name_or_path``, or the absolute folder the adapter recorded for it
        when that relative path does not exist from this working directory."""
        if self.adapter is not None:
            return self.adapter.resolve_base(self.hparams.model_name_or_path, "--model.model_name_or_path")
        return resolve_base(self.hparams.model_name_or_path, "--model.model_name_or_path")

    def _load_base(self, meta: bool = False):
        """The base (:func:`healthai.base_model.load_base`); a 4-bit one onto this process's device; ``meta``: its
        skeleton only."""
        hp = self.hparams
        device = self.trainer.strategy.root_device if hp.quantization and self._trainer is not None else None
        return load_base(self._base_source(), hp.dtype, hp.attn_implementation, quantization=hp.quantization,
                         random_init=hp.random_init, liger_kernel=hp.liger_kernel, device=device,
                         meta=meta)  # fmt: skip

    @property
    def base_model(self):
        """The transformers model: inside the PEFT wrapper (LoRA layers injected in place), or the model itself where
        no LoRA was built (:meth:`builds_lora`)."""
        return self.model.get_base_model() if is_lora(self.model) else self.model

    # -- LoRA initialisations that rewrite the base (PiSSA, OLoRA) and NEFTune: healthai.lora_variants ---------------

    def _keep_initial_lora(self) -> None:
        """After a new PiSSA / OLoRA adapter is built: keep its initial weights, which convert the trained ones into
        an adapter of the unmodified base (saved with every checkpoint and adapter folder)."""
        from healthai.lora_variants import MOVES_BASE, initial_weights

        if self.adapter is None and self.hparams.lora_init in MOVES_BASE:
            self._initial_lora = initial_weights(self.model)

    def _restore_initial_lora(self, recorded: Optional[dict[str, torch.Tensor]], ckpt: Any) -> None:
        """On resume, before the weights load: make this run's rewritten base and initial weights the checkpoint's
        (:func:`healthai.lora_variants.rebase`), so that training continues on the residual it was trained on."""
        if self._initial_lora is None:
            return
        from healthai.lora_variants import rebase
        from healthai.resume import ResumeRefused

        if not recorded:
            raise ResumeRefused(f"--ckpt_path {ckpt} records no initial weights of its model.lora_init "
                                f"{self.hparams.lora_init} adapter, so its base cannot be rebuilt; start a new run")
        rebase(self.model, self._initial_lora, recorded)
        self._initial_lora = recorded

    def keep_buffers_as_built(self) -> None:
        """bf16 weights with fp32 buffers in every command: Lightning's ``bf16-true`` precision casts the whole module
        after :meth:`configure_model` (``convert_module`` in the strategy's set-up), RoPE's ``inv_freq`` included, which
        rounds the rotary angles of long prompts; put the buffers back as built. Called from the first hook after that
        set-up in fit, validate and predict; nothing to do under ``bf16-mixed`` or ``32-true``."""
        restore_float_buffers(self._float_buffers)

    def on_test_start(self) -> None:
        self.keep_buffers_as_built()

    def on_fit_start(self) -> None:
        """NEFTune (``neftune_alpha``): noise on the input embeddings, added by a forward hook that acts only while
        the model is in training mode (Lightning puts it in eval mode for validation, as generation does)."""
        self.keep_buffers_as_built()
        alpha = self.hparams.neftune_alpha
        if alpha and self._neftune_handle is None:
            from healthai.lora_variants import neftune_hook

            embeddings = self.base_model.get_input_embeddings()  # called inside the decoder answer_loss runs
            self._neftune_handle = embeddings.register_forward_hook(neftune_hook(alpha))

    def teardown(self, stage: str) -> None:
        """Take NEFTune's hook off when fit ends, also on an error (the same module may then predict)."""
        if self._neftune_handle is not None:
            self._neftune_handle.remove()
            self._neftune_handle = None

    # -- the base the checks and records name --------------------------------------------------------------------------

    def base_record(self) -> dict[str, Any]:
        """The base this adapter is trained on (:func:`healthai.adapter.base_record`), computed once per job: in a
        process group, on rank 0 only and broadcast (hashing the base is seconds per GB), so the first call is
        collective — :meth:`configure_model` makes it on every rank; later calls read the kept record."""
        if self._base_record is None:
            from healthai.adapter import base_record

            def compute() -> dict[str, Any]:
                # The name as given, with the folder it was found in from here (which may be the adapter's record).
                return {**base_record(self._base_source()), "name_or_path": self.hparams.model_name_or_path}

            self._base_record = on_rank_zero(compute)
        return self._base_record

    def _prompt(self):
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        prompt = getattr(datamodule, "prompt", None)
        if prompt is not None:
            return prompt
        from healthai.prompts import PromptStyle

        return self.adapter.prompt if self.adapter is not None else PromptStyle()

