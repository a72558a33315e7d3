"""``DiagnosisLoRA``: Qwen2.5 with a PEFT LoRA adapter as a LightningModule — fit, validation generation, predict."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from healthai.data import IGNORE_INDEX, end_of_turn_id
from healthai.decoding import GenerationSettings, JsonConstraint, parse_answer
from healthai.loss import head_cross_entropy

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The seven linear projections of every Qwen2 decoder layer."""

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class DiagnosisLoRA(L.LightningModule):
    """Qwen2.5 + LoRA, trained to answer a case record with ``{"diseases": ..., "reason": ...}``."""

    def __init__(
        self,
        model_name_or_path: str = "Qwen/Qwen2.5-7B-Instruct",
        adapter_path: Optional[str] = None,
        dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        attn_implementation: str = "sdpa",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        target_modules: list[str] = ALL_LINEAR,
        gradient_checkpointing: bool = True,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.1,
        generation: GenerationSettings = GenerationSettings(),
        generate_every_n_epochs: int = 1,
        val_generate_limit: int = 32,
        quantization: Optional[Literal["nf4"]] = None,
        random_init: bool = False,
    ):
        """
        Args:
            model_name_or_path: Base model: a hub id (``Qwen/Qwen2.5-7B-Instruct``) or a local folder.
            adapter_path: A LoRA ``adapter/`` folder written by fit. In predict it is applied to the base (null = the
                zero-shot base model); in fit, training continues from it.
            dtype: Dtype of the base weights. bfloat16 on GPU; float32 for exact CPU tests.
            attn_implementation: Attention kernel passed to transformers (``sdpa``, ``flash_attention_2``, ``eager``).
            lora_r: LoRA rank. Higher = more capacity and memory.
            lora_alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
            lora_dropout: Dropout on the LoRA input.
            target_modules: Modules that get a LoRA adapter (default: all seven linear projections).
            gradient_checkpointing: Recompute activations in backward (non-reentrant): much less memory, ~30% slower.
            learning_rate: Peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_ratio: Share of the total steps spent warming the learning rate up linearly from 0.
            min_lr_ratio: The cosine decay ends at ``learning_rate * min_lr_ratio``.
            generation: Decoding settings for validation generation and predict.
            generate_every_n_epochs: In validation, generate answers every this many epochs and log disease
                precision/recall/F1, JSON validity and reason ROUGE-L (0 = never).
            val_generate_limit: Validation records generated for those metrics (a fixed subset: the first ones).
            quantization: ``nf4`` loads the base in 4 bit through bitsandbytes (QLoRA, for 24 GB cards).
            random_init: Build the base from its config with random weights instead of loading them (benchmarks of
                the architecture; never for real training).
        """
        super().__init__()
        if random_init and quantization is not None:
            raise ValueError("random_init builds unquantized weights; it cannot be combined with quantization")
        self.save_hyperparameters()
        self.model_name_or_path = model_name_or_path
        self.adapter_path = adapter_path
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.lora_r, self.lora_alpha, self.lora_dropout = lora_r, lora_alpha, lora_dropout
        self.target_modules = list(target_modules)
        self.gradient_checkpointing = gradient_checkpointing
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.warmup_ratio, self.min_lr_ratio = warmup_ratio, min_lr_ratio
        self.generation = generation
        self.generate_every_n_epochs = generate_every_n_epochs
        self.val_generate_limit = val_generate_limit
        self.quantization = quantization
        self.random_init = random_init
        self.model = None
        self.tokenizer = None
        self._constraint: Optional[JsonConstraint] = None
        self._val_generated = 0
        self._batch_start: Optional[float] = None
        # Checkpoints hold only the adapter (see on_save_checkpoint), so loading them must not expect base weights.
        self.strict_loading = False
        self._init_metrics()

    def _init_metrics(self) -> None:
        from healthai.metrics import DiseaseF1, JsonValidRate, ReasonRougeL

        self.val_disease = DiseaseF1()
        self.val_json_valid = JsonValidRate()
        self.val_rouge = ReasonRougeL()

    # -- building the model -------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the base, apply LoRA and set up checkpointing. Lightning calls this on the target device before a
        checkpoint is restored (so ``fit --ckpt_path`` finds the adapter's parameters in place)."""
        if self.model is not None:
            return
        self.tokenizer = self._tokenizer()
        base = self._load_base()
        self.model = self._apply_lora(base)
        self.model.train()  # from_pretrained returns eval mode; LoRA dropout must be live in fit
        if self.gradient_checkpointing:
            # Non-reentrant checkpointing works with frozen inputs and PEFT. transformers 5 renamed the method (the old
            # name is a deprecated alias there); 4.x has only the old one.
            if hasattr(base, "activation_checkpointing_enable"):
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # Inputs must require grad so that checkpointed segments of a frozen base still back-propagate to LoRA.
            self.model.enable_input_require_grads()
        if self.global_rank == 0:
            self.model.print_trainable_parameters()

    def _tokenizer(self):
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "tokenizer", None) is not None:
            return datamodule.tokenizer
        from transformers import AutoTokenizer

        source = self.adapter_path
        if source is None or not (Path(source) / "tokenizer_config.json").is_file():
            source = self.model_name_or_path
        return AutoTokenizer.from_pretrained(source)

    def _load_base(self):
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = DTYPES[self.dtype_name]
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": self.attn_implementation}
        if self.random_init:
            # Lightning runs configure_model inside the strategy's init context (default device = the GPU), so the
            # weights are created straight on the device: no 15 GB CPU copy of a 7B model.
            config = AutoConfig.from_pretrained(self.model_name_or_path)
            return AutoModelForCausalLM.from_config(config, **kwargs)
        if self.quantization == "nf4":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
            )  # fmt: skip
        base = AutoModelForCausalLM.from_pretrained(self.model_name_or_path, **kwargs)
        if self.quantization == "nf4":
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        return base

    def _apply_lora(self, base):
        from peft import LoraConfig, PeftModel, get_peft_model

        if self.adapter_path is not None:
            return PeftModel.from_pretrained(base, self.adapter_path, is_trainable=True)
        config = LoraConfig(
            r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            target_modules=self.target_modules, task_type="CAUSAL_LM",
        )  # fmt: skip
        return get_peft_model(base, config)

    @property
    def base_model(self):
        """The transformers model inside the PEFT wrapper (LoRA layers injected in place)."""
        return self.model.get_base_model()

    # -- training -----------------------------------------------------------------------------------------------------

    def answer_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over answer tokens, computing LM-head logits only where a label is set.

        Prompts are long and answers short, and the 152k-column LM head dominates compute: gathering the hidden
        states at answer positions before the head skips most of that work, and the frozen head's loss is computed in
        chunks without keeping the logits (:mod:`healthai.loss`).
        """
        base = self.base_model
        base.config.use_cache = False
        hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"][:, 1:]  # position t predicts token t+1
        keep = targets != IGNORE_INDEX
        return head_cross_entropy(hidden[:, :-1][keep], base.get_output_embeddings(), targets[keep])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.answer_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

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
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * self.warmup_ratio)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total, self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- validation ---------------------------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_generated = 0

    def _generate_this_epoch(self) -> bool:
        n = self.generate_every_n_epochs
        return n > 0 and (self.current_epoch + 1) % n == 0 and not self.trainer.sanity_checking

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        batch_size = batch["input_ids"].shape[0]
        self.log("val/loss", self.answer_loss(batch), prog_bar=True, sync_dist=True, batch_size=batch_size)
        if not self._generate_this_epoch() or self._val_generated >= self.val_generate_limit:
            return
        take = min(batch_size, self.val_generate_limit - self._val_generated)
        self._val_generated += take
        answers = self.generate_answers(batch["prompt_ids"][:take], batch["prompt_mask"][:take])
        refs = batch["references"][:take]
        self.val_disease.update([a.diseases or "" for a in answers], [r["diseases"] for r in refs])
        self.val_json_valid.update([a.status for a in answers])
        self.val_rouge.update([a.reason or "" for a in answers], [r["reason"] for r in refs])

    def on_validation_epoch_end(self) -> None:
        if not self._generate_this_epoch():
            return
        scores = self.val_disease.compute()
        self.log_dict({f"val/disease_{k}": v for k, v in scores.items()}, sync_dist=False)
        self.log("val/json_valid", self.val_json_valid.compute())
        self.log("val/reason_rougeL", self.val_rouge.compute())
        for metric in (self.val_disease, self.val_json_valid, self.val_rouge):
            metric.reset()

    # -- generation (validation and predict) --------------------------------------------------------------------------

    def constraint(self) -> JsonConstraint:
        """The answer schema compiled for this tokenizer (compiled once, ~1 s over the 152k vocabulary)."""
        if self._constraint is None:
            g = self.generation
            self._constraint = JsonConstraint(
                self.tokenizer, self.base_model.config.vocab_size, [end_of_turn_id(self.tokenizer)],
                g.max_diseases_chars, g.max_reason_chars,
            )  # fmt: skip
        return self._constraint

    @torch.no_grad()
    def generate_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """Generate from left-padded prompts; returns each row's new text (special tokens removed)."""
        g = self.generation
        eot = end_of_turn_id(self.tokenizer)
        base = self.base_model
        base.config.use_cache = True  # training turned the KV cache off
        sampling = {"temperature": g.temperature, "top_p": g.top_p} if g.do_sample else {}
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=g.max_new_tokens,
            do_sample=g.do_sample,
            eos_token_id=[eot, self.tokenizer.pad_token_id],
            pad_token_id=self.tokenizer.pad_token_id,
            logits_processor=[self.constraint().logits_processor()] if g.constrained else None,
            use_cache=True,
            **sampling,
        )
        return self.tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)

    def generate_answers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """:meth:`generate_texts`, each parsed by :func:`~healthai.decoding.parse_answer`."""
        was_training = self.training
        self.eval()
        try:
            texts = self.generate_texts(input_ids, attention_mask)
        finally:
            self.train(was_training)
        return [parse_answer(t) for t in texts]

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Rows in submission key order (``id, reason, diseases, feature_content, parse_status``), plus the input
        position ``_order`` that the writer uses to merge shards."""
        rows = []
        for record, order, answer in zip(
            batch["records"], batch["order"], self.generate_answers(batch["input_ids"], batch["attention_mask"])
        ):
            row = {"id": record["id"], "reason": answer.reason or "", "diseases": answer.diseases or "",
                   "feature_content": record["feature_content"], "parse_status": answer.status}  # fmt: skip
            if answer.status == "failed":
                row["raw_output"] = answer.raw
            row["_order"] = order
            rows.append(row)
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
        """Keep only trainable (adapter) weights: a checkpoint of the 7B is then tens of MB, not 15 GB."""
        trainable = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def adapter_dir(self) -> Path:
        """``<run folder>/adapter``: next to the TensorBoard events and config of this run. Call it on every rank."""
        run_dir = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(run_dir) / "adapter"

    def save_adapter(self, directory: str | Path, state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
        """Write the PEFT adapter (from ``state_dict`` if given, e.g. gathered under FSDP), the tokenizer and the
        prompt settings to ``directory``."""
        directory = Path(directory)
        self.model.save_pretrained(directory, state_dict=state_dict)
        self.tokenizer.save_pretrained(directory)
        datamodule = getattr(self.trainer, "datamodule", None)
        prompt = getattr(datamodule, "prompt", None)
        if prompt is None:
            from healthai.prompts import PromptStyle

            prompt = PromptStyle.from_dir_or_default(self.adapter_path)
        prompt.save(directory)
        return directory

    def on_train_end(self) -> None:
        if self.trainer.global_step == 0:  # stopped before its first step: the adapter would be its initialisation
            rank_zero_info("no optimizer step was taken: no adapter written")
            return
        # Every rank takes part: under FSDP this gathers the sharded weights; elsewhere it is a plain state_dict.
        state = self.trainer.strategy.lightning_module_state_dict()
        directory = self.adapter_dir()  # collective too: trainer.log_dir broadcasts rank zero's folder
        if self.trainer.is_global_zero:
            trainable = self.trainable_names()
            adapter = {k[len("model.") :]: v for k, v in state.items() if k in trainable}
            path = self.save_adapter(directory, adapter)
            rank_zero_info(f"adapter saved to {path}")


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up from 0 to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
