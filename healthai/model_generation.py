"""How :class:`healthai.model.DiagnosisLoRA` generates: validation's answers (collected per rank, generated at the
validation's end with the LoRA merged and set aside, scored with the answer metrics) and predict's rows, through one
constrained ``generate``. A mixin of the LightningModule, kept apart from its training and checkpoint hooks
(``healthai/model.py``) and its model building (``healthai/model_build.py``)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from healthai.base_model import is_lora, merge_lora, unmerge_lora
from healthai.decoding import JsonConstraint, parse_answer
from healthai.encoding import IGNORE_INDEX, end_of_turn_id
from healthai.generation import check_answer_budget
from healthai.loss import answer_tokens
from healthai.samples import log_samples, sample_row
from healthai.fsdp_generation import gathered_for_generation
from healthai.sharding import synced_generation
from healthai.val_generation import generation_batches, left_padded, pending_from_batch, rank_share
from healthai.val_generation import probe_generation_memory, probe_prompt


class Generating:
    """The generation half of :class:`~healthai.model.DiagnosisLoRA`: validation and predict hooks, LoRA merging for
    inference, ``generate_texts`` / ``generate_answers``."""

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

