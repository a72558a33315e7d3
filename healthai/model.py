"""``DiagnosisLoRA``: Qwen2.5 with a PEFT LoRA adapter as a LightningModule — fit, validation generation, predict."""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from healthai.adapter import Adapter, resolve_base
from healthai.base_model import ALL_LINEAR, apply_lora, check_liger_kernel, is_lora, load_base, merge_lora
from healthai.base_model import FloatBuffers, SetAside, float_buffers, prepare_for_training, restore_float_buffers
from healthai.base_model import unmerge_lora
from healthai.attention_mask import training_attention_mask
from healthai.decoding import JsonConstraint, parse_answer
from healthai.encoding import IGNORE_INDEX, end_of_turn_id
from healthai.generation import AnswerBudget, GenerationSettings, check_answer_budget, check_label_budget
from healthai.generation import resolve_budget
from healthai.errors import ClosedUnitInterval, ConfigError, HalfOpenUnitInterval, NonNegativeFloat, NonNegativeInt
from healthai.errors import PositiveInt, check_declared, check_model_source
from healthai.loss import head_cross_entropy
from healthai.samples import log_samples, sample_row
from healthai.fsdp_generation import gathered_for_generation
from healthai.sharded_load import build_sharded, launched_rank, loads_once, on_rank_zero
from healthai.sharding import gathered_head, synced_generation
from healthai.val_generation import PendingPrompt, generation_batches, left_padded, pending_from_batch, rank_share
from healthai.val_generation import probe_generation_memory, probe_prompt


class DiagnosisLoRA(L.LightningModule):
    """Qwen2.5 + LoRA, trained to answer a case record with ``{"diseases": ..., "reason": ...}``."""

    def __init__(
        self,
        model_name_or_path: str = "Qwen/Qwen2.5-7B-Instruct",
        adapter_path: Optional[str] = None,
        dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        attn_implementation: str = "sdpa",
        lora_r: PositiveInt = 16,
        lora_alpha: PositiveInt = 32,
        lora_dropout: HalfOpenUnitInterval = 0.05,
        target_modules: list[str] = ALL_LINEAR,
        lora_variant: Literal["lora", "dora", "rslora"] = "lora",
        lora_init: Literal["default", "gaussian", "pissa", "olora"] = "default",
        gradient_checkpointing: bool = True,
        learning_rate: NonNegativeFloat = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: ClosedUnitInterval = 0.03,
        min_lr_ratio: ClosedUnitInterval = 0.1,
        neftune_alpha: Optional[NonNegativeFloat] = None,
        generation: GenerationSettings = GenerationSettings(),
        generate_every_n_epochs: NonNegativeInt = 1,
        val_every_n_steps: Optional[PositiveInt] = None,
        val_generate_limit: NonNegativeInt = 32,
        val_generate_batch_size: PositiveInt = 16,
        quantization: Optional[Literal["nf4"]] = None,
        random_init: bool = False,
        val_log_samples: int = 8,
        liger_kernel: bool = False,
        allow_base_mismatch: bool = False,
        merge_for_inference: bool = True,
        synonyms: Optional[str] = None,
    ):
        """
        Args:
            model_name_or_path: Base model: a hub id (``Qwen/Qwen2.5-7B-Instruct``) or a local folder.
            adapter_path: A LoRA ``adapter/`` folder written by fit, or one of fit's checkpoints (``.ckpt``, e.g. a
                best-by-F1 one). In predict and validate it is applied to the base (null = the zero-shot base model);
                in fit, training continues from it. A base other than the one it was trained on is refused.
            dtype: Dtype of the base weights. bfloat16 on GPU; float32 for exact CPU tests.
            attn_implementation: Attention kernel passed to transformers (``sdpa``, ``flash_attention_2``, ``eager``).
            lora_r: LoRA rank. Higher = more capacity and memory.
            lora_alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
            lora_dropout: Dropout on the LoRA input.
            target_modules: Modules that get a LoRA adapter (default: all seven linear projections).
            lora_variant: ``lora``; ``dora`` (DoRA, Liu et al. 2024: a trained magnitude per output row and a
                LoRA-updated direction; slower steps, works with ``quantization: nf4``); ``rslora`` (rank-stabilised
                LoRA, Kalajdzievski 2023: scaling ``lora_alpha / sqrt(lora_r)``, for high ranks). Saved in the
                adapter; predict, serve and export apply it, and a resume with another variant is refused.
            lora_init: How a new adapter starts: ``default`` (PEFT's: A Kaiming-uniform, B zero), ``gaussian`` (A
                Gaussian), ``pissa`` (PiSSA, Meng et al. 2024: A, B from the top singular vectors of each weight, by
                PEFT's randomised SVD ``pissa_niter_4``) or ``olora`` (OLoRA, Büyükakyüz 2024: from its QR
                decomposition). PiSSA and OLoRA take that part out of the base weights while training; the saved
                adapter is converted to a plain LoRA of rank ``2 × lora_r`` on the unmodified base (what predict,
                serve and export load), and each checkpoint also holds the initial A, B (twice the adapter's size).
                Not with ``quantization`` nor with ``dora`` nor under FSDP (refused at start). Ignored with
                ``adapter_path``, whose weights are the start (as are its variant and rank).
            gradient_checkpointing: Recompute activations in backward (non-reentrant): much less memory, ~30% slower.
            learning_rate: Peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_ratio: Share of the total steps spent warming the learning rate up linearly from 0.
            min_lr_ratio: The cosine decay ends at ``learning_rate * min_lr_ratio``.
            neftune_alpha: NEFTune (Jain et al. 2023): add uniform noise of magnitude ``alpha / sqrt(L × hidden)``
                (``L`` the batch's row length, padding or packed records included) to the input embeddings in
                training forwards, never in validation, predict or serve (the paper uses 5-15; null = off).
            generation: Decoding settings for validation generation and predict. Its ``max_new_tokens`` is the
                answer's token budget: fit refuses labels longer than it and saves it with the adapter; null takes
                the adapter's (in fit, validate, predict and serve), else 1024.
            generate_every_n_epochs: In fit's validations, generate answers every this many epochs and log disease
                precision/recall/F1, JSON validity and reason ROUGE-L (0 = never). ``validate`` generates whenever
                it is not 0. A checkpoint callback that monitors one of those metrics needs 1 (checked at start).
            val_every_n_steps: Validate every this many optimizer steps (null = Lightning's
                ``trainer.val_check_interval``, by default once per epoch). Counted in steps, not in micro-batches
                per process: the same setting means the same on 1 or 64 GPUs and whatever
                ``accumulate_grad_batches``, and a validation always falls between two steps. Longer than an epoch:
                validation runs at each epoch's end instead (with a warning).
            val_generate_limit: Validation records generated for those metrics (a fixed subset: the first ones), in
                all: split between the processes, so the score does not depend on the GPU count.
            val_generate_batch_size: Prompts generated together at the end of a validation (with the LoRA merged
                into the base as predict merges it, and the base weights put back bit for bit afterwards; see
                ``merge_for_inference``). Larger than the loss batch: decoding is cheap per row, memory is the KV
                cache of this many rows of prompt + ``max_new_tokens``.
            quantization: ``nf4`` loads the base in 4 bit through bitsandbytes (QLoRA, for 24 GB cards).
            random_init: Build the base from its config with random weights instead of loading them (benchmarks of
                the architecture; never for real training).
            val_log_samples: Each time validation generates, write the first this many validation records (case text
                start, reference and predicted diseases, matched / missed / extra names, parse status, predicted
                reason) as a markdown table to TensorBoard's text tab (tag ``val/samples``), so the same records can
                be followed epoch by epoch (0 = off; other loggers get nothing). Capped by ``val_generate_limit``.
            liger_kernel: Replace the base's RoPE, RMSNorm and SwiGLU with Liger's fused Triton kernels (CUDA only;
                ``pip install -e '.[gpu]'``); the loss stays the project's answer-only loss. Liger patches
                transformers' Qwen2 code for the whole process, not only this model.
            synonyms: A synonym table (docs/evaluate.md): validation also logs ``val/disease_f1_normalized``
                (and its precision/recall) beside the exact ``val/disease_f1``; null = not logged.
            allow_base_mismatch: Apply ``adapter_path`` even to a base whose fingerprint differs from the one the
                adapter was trained on (recorded in its ``base.json``); by default that is refused.
            merge_for_inference: In predict and serve, fold the LoRA weights into the base weights (PEFT's
                ``merge_adapter``) and take the LoRA layers out of the forward path before generating, as serving
                tools do: the same function without the LoRA layers' extra matmuls and calls at every projection
                (unmerged, they cost ~10-20 % of a decoding step of the small model on CPU, bench_predict.py).
                Undone when predict ends. Not done for a 4-bit base (merging would round the adapter into the 4-bit
                weights) nor for a sharded (FSDP) model. Validation generation merges too (fit's keeps a CPU copy of
                the base weights and puts them back bit for bit before training goes on). The
                merged weights are rounded once in ``dtype``: float32 answers are equal (tested), bf16 ones may
                differ from unmerged at near ties, as on another GPU. ``false`` keeps the unmerged layers.
        """
        # Bad values are the user's config errors, named here before anything loads.
        check_model_source(model_name_or_path, "model.model_name_or_path")
        # The ranges are the signature's types (the CLI checks them; lora_alpha 0 would scale the LoRA update to
        # nothing); built in Python, they are checked here. `generation` checks its own.
        check_declared(DiagnosisLoRA.__init__, locals(), "model.")
        super().__init__()
        if random_init and quantization is not None:
            raise ConfigError("model.random_init builds unquantized weights; it cannot be combined with quantization")
        from healthai.lora_variants import check_lora_options

        check_lora_options(lora_variant, lora_init, quantization, adapter_path)
        if liger_kernel:
            check_liger_kernel()  # before anything is loaded: a CPU machine learns it at once, not after the base
        self.save_hyperparameters()  # every argument above is read back as self.hparams.<name>
        self._val_samples: list[dict[str, str]] = []
        self.model = None
        self.tokenizer = None
        self._constraint: Optional[JsonConstraint] = None
        # (parent module, attribute, LoRA layer) of each LoRA layer set aside by merge_lora_for_inference.
        self._lora_set_aside: SetAside = []
        self._lora_originals: list[torch.Tensor] = []  # the base weights before an exact merge (CPU copies)
        self._val_pending: list[PendingPrompt] = []  # this rank's prompts to generate at the validation's end
        self._batch_start: Optional[float] = None
        self._budget_checked = False
        self._base_record: Optional[dict[str, Any]] = None
        # PiSSA / OLoRA: the adapter's initial weights, to save it for the unmodified base (healthai.lora_variants).
        self._initial_lora: Optional[dict[str, torch.Tensor]] = None
        self._neftune_handle: Optional[torch.utils.hooks.RemovableHandle] = None
        # RoPE's buffers as built (fp32), put back after a bf16-true / 16-true cast: see keep_buffers_as_built.
        self._float_buffers: FloatBuffers = []
        self.adapter = Adapter.open(adapter_path) if adapter_path is not None else None
        """The adapter applied to the base (:class:`~healthai.adapter.Adapter`), or None."""
        # Decoding settings are also replaced at run time (a benchmark may shorten them): they stay an attribute.
        # A null budget is the adapter's (what its labels were checked against), else the default.
        self.generation = resolve_budget(generation, self.adapter.budget if self.adapter is not None else None)
        self.answer_budget: Optional[AnswerBudget] = None
        """The budget fit checked the labels against and their longest answer: saved with the adapter."""
        # Summed over the micro-batches of the optimizer step under way (see on_before_optimizer_step).
        self._step_loss_sum = torch.zeros((), dtype=torch.float64)
        self._step_tokens = torch.zeros((), dtype=torch.float64)
        # The same for validation (see validation_step).
        self._val_loss_sum = torch.zeros((), dtype=torch.float64)
        self._val_tokens = torch.zeros((), dtype=torch.float64)
        # Checkpoints hold only the adapter (see on_save_checkpoint), so loading them must not expect base weights.
        self.strict_loading = False
        # A rank started by a launcher (torchrun, srun, Lightning's own for the ranks after the first) checks in setup,
        # against the fingerprint rank 0 computed: every rank hashing a 15 GB base at once took ~25 s (#30 item 8).
        self._base_checked = adapter_path is None or random_init
        if not self._base_checked and not launched_rank():
            self._check_base(allow_base_mismatch)
            self._base_checked = True
        self._init_metrics()

    def _init_metrics(self) -> None:
        from healthai.metrics import answer_metrics
        from healthai.synonyms import normalizer_from

        # The collection evaluate scores with too: a metric added there is logged as val/<name>.
        synonyms = self.hparams.get("synonyms")
        self.val_answer_metrics = answer_metrics(normalizer_from(synonyms) if synonyms else None)

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

    # -- training -----------------------------------------------------------------------------------------------------

    def answer_loss(self, batch: dict[str, torch.Tensor], reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
        """Cross-entropy over the batch's answer tokens (their mean, or with ``reduction="sum"`` their sum),
        computing LM-head logits only where a label is set.

        Prompts are long and answers short, and the 152k-column LM head dominates compute: gathering the hidden
        states at answer positions before the head skips most of that work, and the frozen head's loss is computed in
        chunks without keeping the logits (:mod:`healthai.loss`).
        """
        base = self.base_model
        base.config.use_cache = False
        # A packed batch (data.packing) brings position ids that restart at each record and no attention mask:
        # transformers then keeps attention within each record (healthai.batching.PackingCollator). A right-padded
        # batch needs no mask either (healthai.attention_mask), which keeps sdpa on its fused causal kernel.
        hidden = base.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=training_attention_mask(batch),
            position_ids=batch.get("position_ids"),
        ).last_hidden_state  # fmt: skip
        targets = batch["labels"][:, 1:]  # position t predicts token t+1
        keep = targets != IGNORE_INDEX
        with gathered_head(base) as head:  # sharded (FSDP), the head's weight is gathered for the chunked loss
            return head_cross_entropy(hidden[:, :-1][keep], head, targets[keep], reduction)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # The sum, not the mean: on_before_optimizer_step divides the step's gradient by all of its answer tokens.
        loss_sum = self.answer_loss(batch, reduction="sum")
        self._step_loss_sum = self._step_loss_sum.to(loss_sum.device) + loss_sum.detach()
        self._step_tokens = self._step_tokens.to(loss_sum.device) + answer_tokens(batch["labels"])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss_sum

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the step's gradient the mean over every answer token of the step, on every rank.

        Each micro-batch back-propagated its summed loss, which Lightning divided by ``accumulate_grad_batches``
        (also in an epoch's last, shorter window) and DDP/FSDP averaged over the ranks. Multiplying by
        ``accumulate_grad_batches × world_size / N``, N the answer tokens of the step on all ranks, leaves
        ``d(sum of token losses)/N``: every token weighs the same, however the micro-batches and ranks split them
        (the weighting transformers' ``num_items_in_batch``, torchtune and TRL use). Lightning calls this hook after
        the last backward (gradients already all-reduced) and before gradient clipping, so clipping sees the true
        gradient.
        """
        from healthai.finite import check_step, squared_norm

        grads = [param.grad for group in optimizer.param_groups for param in group["params"] if param.grad is not None]
        # The gradient's squared norm (this rank's shard under FSDP) rides along in the same all-reduce: every rank
        # then holds the same totals and stops at the same step when one is not finite (healthai.finite).
        totals = torch.stack([self._step_loss_sum.to(self.device), self._step_tokens.to(self.device),
                              squared_norm(grads, self.device)])  # fmt: skip
        loss_sum, tokens, grad_sq = self.trainer.strategy.reduce(totals, reduce_op="sum").tolist()
        self._step_loss_sum = torch.zeros_like(self._step_loss_sum)
        self._step_tokens = torch.zeros_like(self._step_tokens)
        tokens = max(tokens, 1.0)
        check_step(loss_sum / tokens, grad_sq, self.trainer.global_step + 1)
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / tokens
        for grad in grads:
            grad.mul_(scale)
        self.log("train/loss", loss_sum / tokens, prog_bar=True)

    def setup(self, stage: str) -> None:
        """Checks and settings of fit that must come before the base loads (Lightning calls this first, after the
        data module has read and encoded the records)."""
        if stage != "fit":
            return
        from healthai.resume import check_max_steps

        check_max_steps(self.trainer)
        check_monitored_metrics(self.trainer.callbacks, self.hparams.generate_every_n_epochs)
        self._check_label_budget()
        if getattr(getattr(self.trainer, "datamodule", None), "packing", False):
            check_packing_attention(self.hparams.attn_implementation)
        if self.hparams.val_every_n_steps is not None:
            self._set_validation_interval()

    def _check_label_budget(self) -> None:
        """After the data module has read and encoded the labels, before the base is loaded: refuse labels longer than
        the answer's token budget (:func:`healthai.generation.check_label_budget`), and keep the budget and the
        longest label to save with the adapter."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            splits = {"training": getattr(datamodule, "train_set", None),
                      "validation": getattr(datamodule, "val_set", None)}  # fmt: skip
            self.answer_budget = check_label_budget(splits, self.generation.budget)

    def _set_validation_interval(self) -> None:
        """Translate ``val_every_n_steps`` into Lightning's ``val_check_interval`` (micro-batches per process)."""
        trainer = self.trainer
        if trainer.val_check_interval != 1.0:
            raise ConfigError(f"model.val_every_n_steps {self.hparams.val_every_n_steps} and trainer.val_check_interval "
                              f"{trainer.val_check_interval} both say when to validate; set only one")  # fmt: skip
        datamodule = getattr(trainer, "datamodule", None)
        batches = datamodule.train_batches() if hasattr(datamodule, "train_batches") else None
        trainer.val_check_interval = validation_interval(self.hparams.val_every_n_steps,
                                                         trainer.accumulate_grad_batches, batches)  # fmt: skip

    def on_train_start(self) -> None:
        every, accumulate = self.trainer.val_check_batch, self.trainer.accumulate_grad_batches
        if isinstance(every, int) and every % accumulate and every < self.trainer.num_training_batches:
            # A checkpoint written there holds neither the window's gradient so far nor its token count.
            rank_zero_warn(
                f"validation runs every {every} batches, inside windows of accumulate_grad_batches={accumulate}: "
                f"checkpoints it writes resume without that window's partial gradient; make val_check_interval a "
                f"multiple of {accumulate} batches for exact resumes"
            )

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        real = int(batch["attention_mask"].sum())
        total = batch["attention_mask"].numel()
        self.log("train/padding_fraction", 1.0 - real / total)
        if self._batch_start is not None:
            seconds = time.perf_counter() - self._batch_start
            self.log("train/tokens_per_sec", real * self.trainer.world_size / max(seconds, 1e-9))

    def configure_optimizers(self):
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=int(total * hp.warmup_ratio), num_training_steps=total,
            min_lr_rate=hp.min_lr_ratio,
        )  # fmt: skip
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- validation ---------------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_pending = []
        self._val_samples = []
        self._val_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_tokens = torch.zeros((), dtype=torch.float64, device=self.device)

    def on_validation_start(self) -> None:
        self.keep_buffers_as_built()
        if self.hparams.generate_every_n_epochs > 0:
            self.check_answer_budget()
        elif not self._fitting():
            rank_zero_info("validate: model.generate_every_n_epochs 0: no generated answers, so val/loss alone (set it "
                           "to 1 for disease P/R/F1, JSON validity and reason ROUGE-L)")  # fmt: skip

    def _generate_this_epoch(self) -> bool:
        """Whether this validation generates answers for the answer metrics: in fit, every ``generate_every_n_epochs``
        epochs (never in the sanity check); in validate, which has no epochs to count, whenever it is not 0."""
        n = self.hparams.generate_every_n_epochs
        if n == 0 or self.trainer.sanity_checking:
            return False
        return not self._fitting() or (self.current_epoch + 1) % n == 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Rows the sampler repeated to keep the processes in step (EvalSampler) run through the model like the others
        # (every rank does the same work) but count in no metric.
        repeat = batch.get("repeat")
        flags = repeat.tolist() if repeat is not None else [False] * batch["input_ids"].shape[0]
        rows = [i for i, repeated in enumerate(flags) if not repeated]
        labels = batch["labels"]
        if len(rows) < labels.shape[0]:
            labels = labels.clone()
            labels[repeat.to(labels.device)] = IGNORE_INDEX
        # Summed over the answer tokens, divided at the epoch's end by all of them on every rank: val/loss is a mean
        # per token, as train/loss is, not a mean of per-batch means.
        loss_sum = self.answer_loss({**batch, "labels": labels}, reduction="sum")
        self._val_loss_sum = self._val_loss_sum.to(loss_sum.device) + loss_sum.detach()
        self._val_tokens = self._val_tokens.to(loss_sum.device) + answer_tokens(labels)
        if not self._generate_this_epoch():
            return
        # Generated at the epoch's end (healthai.val_generation), this rank's share of the global limit.
        room = rank_share(self.hparams.val_generate_limit, self.global_rank, self.trainer.world_size)
        self._val_pending += pending_from_batch(batch, rows[: max(0, room - len(self._val_pending))])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking and self._fitting() and self.hparams.generate_every_n_epochs > 0:
            self._probe_generation_memory()
        totals = torch.stack([self._val_loss_sum, self._val_tokens]).to(self.device)
        loss_sum, tokens = self.trainer.strategy.reduce(totals, reduce_op="sum").tolist()
        # Already summed over the ranks, so every rank holds the same value (sync_dist averages equal numbers; it only
        # spares Lightning's warning about unsynchronised epoch metrics).
        self.log("val/loss", loss_sum / max(tokens, 1.0), prog_bar=True, sync_dist=True)
        if not self._generate_this_epoch():
            return
        self._generate_pending()
        # compute() adds up every rank's states (a collective), so the logged values need no sync_dist.
        self.log_dict({f"val/{k}": v for k, v in self.val_answer_metrics.compute().items()}, sync_dist=False)
        self.val_answer_metrics.reset()
        self._log_val_samples()

    def _probe_generation_memory(self) -> None:
        """Fit's sanity check also meets the first validation generation's memory peak (the longest prompt to
        generate, plus the budget, at ``val_generate_batch_size``): :func:`healthai.val_generation.probe_prompt`."""
        val_set = getattr(getattr(self.trainer, "datamodule", None), "val_set", None)
        if val_set is None:
            return
        ids, rows = probe_prompt(val_set.examples, self.hparams.val_generate_limit, self.hparams.val_generate_batch_size,
                                 self.trainer.world_size, self.generation.budget)  # fmt: skip
        if rows:
            self.base_model.config.use_cache = True
            probe_generation_memory(self.model, ids, rows, self.device)

    def _generate_pending(self) -> None:
        """Generate the prompts :meth:`validation_step` collected, in batches of ``val_generate_batch_size``, with the
        LoRA merged and set aside as predict does; in fit the base weights are put back bit for bit afterwards."""
        pending, self._val_pending = self._val_pending, []
        size = self.hparams.val_generate_batch_size
        calls = -(-len(pending) // size)
        if synced_generation(self.model):  # sharded: every rank makes as many generate calls
            calls = int(self.trainer.strategy.reduce(torch.tensor(calls, device=self.device),
                                                     reduce_op=torch.distributed.ReduceOp.MAX))  # fmt: skip
        if calls == 0:
            return
        answers = {}
        merged = self.merge_lora_for_inference(exact=self._fitting())
        try:
            for prompts, counted in generation_batches(pending, size, calls):
                ids, mask = left_padded(prompts, self.tokenizer.pad_token_id, self.device)
                for prompt, answer in zip(prompts[:counted], self.generate_answers(ids, mask)):
                    answers[id(prompt)] = answer
        finally:
            if merged:
                self.unmerge_lora()
        if pending:
            self.val_answer_metrics.update([answers[id(p)] for p in pending], [p.reference for p in pending])
        for p in pending[: self.hparams.val_log_samples]:  # the first records, in validation order
            self._val_samples.append(sample_row(p.record_id, p.case_text, p.reference, answers[id(p)]))

    def _log_val_samples(self) -> None:
        """The sample table (see ``val_log_samples``) to TensorBoard: :func:`healthai.samples.log_samples`. Collective:
        every rank calls it (they all do, at the same epochs)."""
        log_samples(self.trainer, self._val_samples, self.hparams.val_log_samples)

    # -- generation (validation and predict) --------------------------------------------------------------------------

    def constraint(self) -> JsonConstraint:
        """The answer grammar compiled for this tokenizer (compiled once, ~1 s over the 152k vocabulary)."""
        if self._constraint is None:
            vocab_size = self.base_model.config.vocab_size
            self._constraint = JsonConstraint(self.tokenizer, vocab_size, end_of_turn_id(self.tokenizer))
        return self._constraint

    def check_answer_budget(self) -> None:
        """Say at start-up, once, when the budget is below the longest answer the adapter was trained on (a warning:
        such answers are closed by the budget, ``truncated``); an error when no answer can fit."""
        if self._budget_checked:
            return
        self._budget_checked = True
        recorded = self.adapter.budget if self.adapter is not None else None
        message = check_answer_budget(self.tokenizer, self.generation, recorded, "model.generation.max_new_tokens")
        if message is not None:
            rank_zero_warn(f"WARNING: {message}")

    def on_predict_start(self) -> None:
        self.keep_buffers_as_built()
        self.check_answer_budget()
        self.merge_lora_for_inference()

    def on_predict_end(self) -> None:
        self.unmerge_lora()

    def lora_merge_allowed(self) -> bool:
        """Whether :meth:`merge_lora_for_inference` merges this model: asked (``merge_for_inference``), and safe — not a
        4-bit base (merging rounds the adapter into 4-bit weights) nor a sharded one (each rank holds a slice of every
        weight; merging there is not verified). Known from the settings alone, before the model is built."""
        hp = self.hparams
        sharded = self.device_mesh is not None  # as configure_model decides to shard
        return hp.merge_for_inference and hp.quantization is None and not sharded

    def merge_lora_for_inference(self, exact: bool = False) -> bool:
        """Fold the LoRA weights into the base weights for generation (see the ``merge_for_inference`` option and
        :func:`healthai.base_model.merge_lora`); returns whether the model is merged now. :meth:`unmerge_lora`
        restores the trainable layers. A model without a LoRA (zero-shot, :meth:`builds_lora`) has nothing to merge:
        False, and it generates with the base weights alone, as a merged one does. ``exact``: the base weights are
        kept (on the CPU) and put back bit for bit by :meth:`unmerge_lora` (a validation in the middle of fit)."""
        if not self.lora_merge_allowed() or not is_lora(self.model):
            return False
        if not self._lora_set_aside:
            self._lora_set_aside, self._lora_originals = merge_lora(self.model, keep_originals=exact)
        return True

    def unmerge_lora(self) -> None:
        """Undo :meth:`merge_lora_for_inference` (the same module may go on training or validating)."""
        unmerge_lora(self.model, self._lora_set_aside, self._lora_originals)
        self._lora_set_aside, self._lora_originals = [], []

    def lora_merged(self) -> bool:
        """Whether the LoRA weights are merged into the base weights and the LoRA layers out of the forward path."""
        return bool(self._lora_set_aside)

    @torch.no_grad()
    def generate_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                       ) -> tuple[list[str], list[bool], list[int]]:  # fmt: skip
        """Generate from left-padded prompts: each row's new text (special tokens removed), whether the budget ended
        it (the constraint says; never under unconstrained decoding) and how many tokens it took (end-of-turn
        included)."""
        g = self.generation
        base = self.base_model
        base.config.use_cache = True  # training turned the KV cache off
        pad, end = self.tokenizer.pad_token_id, end_of_turn_id(self.tokenizer)
        config = g.transformers_config([end, pad], pad)
        # generate() fills unset fields of a passed config from the model's own (the checkpoint's
        # generation_config.json: Qwen's sampling and repetition_penalty 1.05); with ours as the model's own too,
        # every decoding parameter is the project's.
        base.generation_config = copy.deepcopy(config)
        processor = self.constraint().logits_processor(g.budget) if g.constrained else None
        # Sharded (FSDP2), the layers are gathered once for the call, not at every decoding step, and the steps hold
        # no collective: no rank has to keep stepping for the others (healthai.fsdp_generation).
        with gathered_for_generation(self.model) as gathered:
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=[processor] if processor is not None else None,
                synced_gpus=False if gathered else synced_generation(self.model),
            )
        new = out[:, input_ids.shape[1] :].tolist()
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        truncated = processor.truncated() if processor is not None else [False] * len(texts)
        stops = {end, pad}
        lengths = [next((k + 1 for k, t in enumerate(row) if t in stops), len(row)) for row in new]
        return texts, truncated, lengths

    def generate_answers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """:meth:`generate_texts`, each parsed by :func:`~healthai.decoding.parse_answer` (``truncated`` where the
        budget ended it), with its prompt and completion token counts."""
        was_training = self.training
        self.eval()
        try:
            texts, truncated, lengths = self.generate_texts(input_ids, attention_mask)
        finally:
            self.train(was_training)
        answers = [parse_answer(t, truncated=cut) for t, cut in zip(texts, truncated)]
        for answer, prompt_tokens, n in zip(answers, attention_mask.sum(-1).tolist(), lengths):
            answer.prompt_tokens, answer.completion_tokens = int(prompt_tokens), n
        return answers

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Rows in submission key order (``id, reason, diseases, feature_content, parse_status``), plus the input
        position ``_order`` that the writer uses to merge shards."""
        rows = []
        for record, order, answer in zip(
            batch["records"], batch["order"], self.generate_answers(batch["input_ids"], batch["attention_mask"])
        ):
            row = {"id": record["id"], "feature_content": record["feature_content"], **answer.row_fields()}
            rows.append({**row, "_order": order})  # the writer puts the keys in submission order
        return rows

    # -- checkpoints and the adapter ----------------------------------------------------------------------------------

    def trainable_names(self) -> set[str]:
        """State-dict names of the trainable (adapter) weights, with FSDP / activation-checkpoint wrapper prefixes
        removed (a full state dict gathered under FSDP carries the original names)."""
        names = set()
        for name, param in self.named_parameters():
            if param.requires_grad:
                for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
                    name = name.replace(wrapper, "")
                names.add(name)
        return names

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable (adapter) weights: a checkpoint of the 7B is then tens of MB, not 15 GB. Record the
        base, the prompt and the validation metrics too, so that the ``.ckpt`` is an adapter predict can take."""
        trainable = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        from healthai.adapter import CKPT_KEY

        from healthai.resume import lora_settings

        checkpoint[CKPT_KEY] = {"base": self.base_record(), "prompt": dataclasses.asdict(self._prompt()),
                                "lora": lora_settings(self.model), "val_metrics": self._val_metrics()}  # fmt: skip
        if self.answer_budget is not None:
            checkpoint[CKPT_KEY]["budget"] = dataclasses.asdict(self.answer_budget)
        if self._initial_lora is not None:  # PiSSA / OLoRA: what makes the weights an adapter of the unmodified base
            checkpoint[CKPT_KEY]["initial_lora"] = self._initial_lora

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another base, LoRA settings or prompt, or one that does not restore every trainable
        weight (Lightning loads it non-strictly: it holds no base weights) — before anything of it is loaded."""
        from healthai.adapter import CKPT_KEY
        from healthai.resume import check_all_restored, check_checkpoint_matches, lora_settings

        ckpt = self.trainer.ckpt_path
        if not is_lora(self.model):
            # A zero-shot validate or predict given --ckpt_path: build the LoRA its weights load into (configure_model,
            # called before, does not know of the checkpoint). Its options are the checkpoint's hyperparameters, which
            # LightningCLI reads from it; they are compared with its record below all the same.
            self._wrap_in_lora(self.model)
        recorded = checkpoint.get(CKPT_KEY) or {}
        check_checkpoint_matches(recorded, self.base_record(), lora_settings(self.model),
                                 dataclasses.asdict(self._prompt()), ckpt, self.hparams.allow_base_mismatch)  # fmt: skip
        if "state_dict" in checkpoint:
            check_all_restored(checkpoint["state_dict"], self.trainable_names(), ckpt)
        self._restore_initial_lora(recorded.get("initial_lora"), ckpt)

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

    def _val_metrics(self) -> dict[str, float]:
        metrics = self._trainer.callback_metrics if self._trainer is not None else {}
        return {k: float(v) for k, v in metrics.items() if k.startswith("val/")}


PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
"""Attention implementations that keep a packed row's records apart: transformers builds their masks (or, for
flash-attention, sequence lengths) from position ids that restart at each record."""


def check_packing_attention(attn_implementation: str) -> None:
    """Refuse at start (one line) packing with an attention implementation that would attend across records."""
    if attn_implementation not in PACKING_ATTENTION:
        raise ConfigError(f"data.packing true needs an attention implementation that keeps packed records apart "
                          f"({', '.join(PACKING_ATTENTION)}); model.attn_implementation {attn_implementation!r} would "
                          "let each record attend to the ones packed before it: pick one of those or set data.packing "
                          "false")  # fmt: skip


def check_monitored_metrics(callbacks: list, generate_every_n_epochs: int) -> None:
    """Refuse at start a callback (ModelCheckpoint, EarlyStopping) monitoring a generated metric (``val/<name>`` of
    :func:`healthai.metrics.answer_metrics`) that some validations would not log: Lightning stops at the first such
    validation, hours into a run."""
    from healthai.metrics import answer_metrics

    if generate_every_n_epochs == 1:
        return
    generated = {f"val/{name}" for name in answer_metrics().names()}
    for callback in callbacks:
        monitor = getattr(callback, "monitor", None)
        if monitor in generated:
            n = generate_every_n_epochs
            when = "never generates" if n == 0 else f"generates every {n} epochs"
            raise ConfigError(f"{type(callback).__name__} monitors {monitor}, which only validations that generate "
                              f"log, and model.generate_every_n_epochs {generate_every_n_epochs} {when}; set "
                              "model.generate_every_n_epochs 1 or monitor val/loss")  # fmt: skip


def validation_interval(every_n_steps: int, accumulate: int, batches_per_epoch: Optional[int]) -> int | float:
    """Lightning's ``val_check_interval`` for "every ``every_n_steps`` optimizer steps": that many windows of
    ``accumulate`` micro-batches per process (so a validation never splits a window), or 1.0 (each epoch's end, also
    between steps) when an epoch has fewer batches than that."""
    batches = every_n_steps * accumulate
    if batches_per_epoch is not None and batches > batches_per_epoch:
        steps = -(-batches_per_epoch // accumulate)
        rank_zero_warn(f"WARNING: model.val_every_n_steps {every_n_steps} is longer than an epoch ({steps} step(s) on "
                       "this data and number of processes): validating at each epoch's end instead")  # fmt: skip
        return 1.0
    return batches


def answer_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Answer tokens in a batch: the positions :meth:`DiagnosisLoRA.answer_loss` scores (labels shifted by one). A
    tensor on the labels' device, so counting does not wait for the GPU."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()
