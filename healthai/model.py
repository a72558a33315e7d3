"""``DiagnosisLoRA``: Qwen2.5 with a PEFT LoRA adapter as a LightningModule — fit, validation generation, predict.

This file holds its options, training and checkpoint hooks; building the model is :mod:`healthai.model_build`, and
generating (validation answers, predict rows) :mod:`healthai.model_generation`: two mixins of the one class."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from healthai.adapter import Adapter
from healthai.base_model import ALL_LINEAR, check_liger_kernel, is_lora
from healthai.base_model import FloatBuffers, SetAside
from healthai.attention_mask import training_attention_mask
from healthai.decoding import JsonConstraint
from healthai.encoding import IGNORE_INDEX
from healthai.generation import AnswerBudget, GenerationSettings, check_label_budget, resolve_budget
from healthai.errors import ClosedUnitInterval, ConfigError, HalfOpenUnitInterval, NonNegativeFloat, NonNegativeInt
from healthai.errors import PositiveInt, check_declared, check_model_source
from healthai.loss import answer_tokens, head_cross_entropy
from healthai.sharded_load import launched_rank
from healthai.sharding import gathered_head
from healthai.val_generation import PendingPrompt
from healthai.model_build import ModelBuilding
from healthai.model_generation import Generating


class DiagnosisLoRA(ModelBuilding, Generating, L.LightningModule):
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
        from healthai.shared_folder import check_checkpoints_shared

        check_max_steps(self.trainer)
        check_checkpoints_shared(self.trainer)  # on several nodes: a resume reads them on every rank
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
