"""The data stage, :class:`DiagnosisDataModule`: validated JSONL records read, split into training and validation,
encoded once (:mod:`healthai.encoding`) and served in batches (:mod:`healthai.batching`) for fit, validate and
predict."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any, Optional

import lightning as L
from torch.utils.data import DataLoader

from healthai.adapter import Adapter
from healthai.batching import EvalSampler, LengthGroupedSampler, PaddedEvalSet, PromptCollator, ResumableLoader
from healthai.batching import PackingCollator, TrainCollator
from healthai.encoding import EncodedDataset, encode_example, fit_case_text, prompt_ids
from healthai.errors import ConfigError, HalfOpenUnitInterval, InputError, check_declared, check_model_source
from healthai.errors import NonNegativeInt, PositiveInt
from healthai.jsonl import BadRecordError, OnBadRecord, Rejects, rejects_path_for
from healthai.prompts import PromptStyle
from healthai.records import read_records
from healthai.splits import ValOverlap, separate_validation, val_fraction_in_use

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# The data module
# --------------------------------------------------------------------------------------------------------------------


class DiagnosisDataModule(L.LightningDataModule):
    """JSONL case records for fit, validation and predict."""

    def __init__(
        self,
        train_file: Optional[str] = None,
        val_file: Optional[str] = None,
        predict_file: Optional[str] = None,
        tokenizer_path: Optional[str] = None,
        adapter_path: Optional[str] = None,
        prompt: Optional[PromptStyle] = None,
        max_length: PositiveInt = 2048,
        batch_size: PositiveInt = 4,
        eval_batch_size: Optional[PositiveInt] = None,
        val_fraction: Optional[HalfOpenUnitInterval] = None,
        val_overlap: ValOverlap = "error",
        seed: int = 42,
        on_bad_record: OnBadRecord = "error",
        pad_to_multiple_of: PositiveInt = 1,
        mega_batch_mult: PositiveInt = 50,
        packing: bool = False,
        num_workers: NonNegativeInt = 0,
        allow_layout_change: bool = False,
    ):
        """
        Args:
            train_file: JSONL of labelled records (``id``, ``feature_content``, ``diseases``, ``reason``) for fit.
            val_file: JSONL of labelled records for validation. If unset, ``val_fraction`` of ``train_file`` is held
                out instead.
            predict_file: JSONL of records (``id``, ``feature_content``) to predict.
            tokenizer_path: Tokenizer folder or hub id. Linked from ``model.model_name_or_path`` by the CLI; an
                ``adapter_path`` holding a tokenizer takes precedence.
            adapter_path: Adapter folder (or fit ``.ckpt``) written by fit. Linked from ``model.adapter_path``: its saved
                prompt settings (``prompt.json``) are used, so training and prediction prompts cannot drift (one
                without any: the default prompt, with a warning; see :class:`~healthai.adapter.Adapter`).
            prompt: Prompt settings (system message, user template), when there is no ``adapter_path``. Default:
                :class:`~healthai.prompts.PromptStyle`.
            max_length: Longest tokenised example (prompt + answer) in fit, and longest prompt in predict. Longer
                records have their case text trimmed — never the answer; the count is logged.
            batch_size: Training micro-batch size per device.
            eval_batch_size: Batch size for validation and predict (default: ``batch_size``).
            val_fraction: Share of ``train_file`` held out for validation when no ``val_file`` is given (0 = none;
                null = 0.05). Given beside a ``val_file`` it is refused: one of the two would be ignored.
            val_overlap: What to do with an id present in both ``train_file`` and ``val_file``: ``error`` (refused,
                naming the count and one id), ``drop`` (trained without, with a warning) or ``keep`` (trained on and
                validated on, with a warning; only for checking memorisation). See :mod:`healthai.splits`.
            seed: Seed of the train/validation split and the sampler's shuffling.
            on_bad_record: ``error`` stops with ``file:line`` and the reason; ``skip`` writes the record and reason to
                ``<file>.rejects.jsonl`` and goes on.
            pad_to_multiple_of: Round padded lengths up to a multiple of this (8 helps tensor cores on GPU).
            mega_batch_mult: Mega-batch size, in global batches, within which the sampler sorts by length. Larger =
                less padding, less randomness.
            packing: Padding-free training batches: each micro-batch's records are concatenated into rows of at most
                ``max_length`` tokens, ``position_ids`` restarting at each record and no attention across records
                (:class:`~healthai.batching.PackingCollator`; fit refuses an attention implementation that would
                attend across them). A micro-batch is still ``batch_size`` records and the loss is still per token, so
                steps, resumes and the loss are those of an unpacked run: only the padding goes. Validation and predict
                are not packed.
            num_workers: DataLoader worker processes.
            allow_layout_change: On ``fit --ckpt_path``, accept a checkpoint written in another training layout
                (number of processes, batch size, accumulation, sampler settings, seed, training or validation
                records): the epoch's order is drawn again in this layout and the run goes on at the checkpoint's
                batch count, so that epoch may repeat or miss records (later epochs are whole). By default such a
                resume is refused naming the change.
        """
        # The ranges are the signature's types (the CLI checks them); built in Python, they are checked here: a bad
        # value is the user's config error, named here, not a ZeroDivisionError deep in a sampler.
        check_declared(DiagnosisDataModule.__init__, locals(), "data.")
        if tokenizer_path is not None:
            check_model_source(tokenizer_path, "data.tokenizer_path")
        self.val_fraction = val_fraction_in_use(val_fraction, val_file)  # before anything loads
        super().__init__()
        self.save_hyperparameters(ignore=["prompt"])
        self.train_file, self.val_file, self.predict_file = train_file, val_file, predict_file
        self.tokenizer_path = tokenizer_path
        self.adapter_path = adapter_path
        self.adapter = Adapter.open(adapter_path) if adapter_path is not None else None
        self.prompt = self._resolve_prompt(prompt, self.adapter)
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_overlap = val_overlap
        self.seed = seed
        self.on_bad_record = on_bad_record
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mega_batch_mult = mega_batch_mult
        self.packing = packing
        self.num_workers = num_workers
        self.allow_layout_change = allow_layout_change
        self.tokenizer = None
        self._rejects: dict[str, Rejects] = {}
        self._train_loader: Optional[ResumableLoader] = None
        self._resume: Optional[dict[str, int]] = None  # the train loader's position, from a checkpoint
        self.train_set: Optional[EncodedDataset] = None
        self.val_set: Optional[EncodedDataset] = None
        self.predict_set: Optional[EncodedDataset] = None
        self.predict_order: dict[Any, int] = {}
        """Input position of every predict record's id, for merging rows back into input order."""

    @staticmethod
    def _resolve_prompt(prompt: Optional[PromptStyle], adapter: Optional[Adapter]) -> PromptStyle:
        if adapter is None:
            return prompt or PromptStyle()
        saved = adapter.prompt  # a folder's prompt.json, or a fit .ckpt's record (Adapter's one prompt rule)
        if prompt is not None and prompt != saved:
            log.warning("prompt settings given in the config differ from %s's; using the adapter's", adapter)
        return saved

    # -- set-up -------------------------------------------------------------------------------------------------------

    def load_tokenizer(self):
        """The tokenizer: the adapter's copy if it has one (saved by fit), else ``tokenizer_path``'s."""
        from transformers import AutoTokenizer

        base = self.tokenizer_path
        if base is not None and self.adapter is not None:  # found from another working directory too
            base = self.adapter.resolve_base(base, "--model.model_name_or_path")
        source = self.adapter.tokenizer_source(base) if self.adapter is not None else base
        if source is None:
            raise ConfigError("data.tokenizer_path is not set (the CLI links it from model.model_name_or_path)")
        if self.adapter is None:  # the first thing fit, validate and predict load: a name the hub cannot give stops here
            from healthai.hub import check_hub_model

            check_hub_model(source, "model.model_name_or_path")
        tokenizer = AutoTokenizer.from_pretrained(source)
        if tokenizer.pad_token_id is None:
            raise InputError(f"{source}: tokenizer has no pad token")
        return tokenizer

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.load_tokenizer()
            self._check_max_length()
        if stage in ("fit", "validate") and self.train_set is None and self.val_set is None:
            self._setup_fit(stage)
        if stage == "predict" and self.predict_set is None:
            self.predict_set = self._encode_prompts(self._read(self.predict_file, "predict_file", labelled=False))

    def _read(self, path: Optional[str], name: str, labelled: bool) -> list[dict]:
        if path is None:
            raise ConfigError(f"data.{name} is not set")
        rejects = self._rejects_for(path) if self.on_bad_record == "skip" else None
        return read_records(path, labelled=labelled, on_bad_record=self.on_bad_record, rejects=rejects)

    def _rejects_for(self, path: str | Path) -> Rejects:
        """One rejects file per input file (``<input>.rejects.jsonl``), shared by reading and encoding."""
        key = str(path)
        if key not in self._rejects:
            self._rejects[key] = Rejects(rejects_path_for(path))
        return self._rejects[key]

    def _setup_fit(self, stage: str) -> None:
        if stage == "fit" or self.val_file is None:
            records = self._read(self.train_file, "train_file", labelled=True)
        else:
            records = []
        if self.val_file is not None:
            val = self._read(self.val_file, "val_file", labelled=True)
            train = separate_validation(records, val, self.train_file, self.val_file, self.val_overlap)
        else:
            train, val = split_records(records, self.val_fraction, self.seed)
            if stage == "fit" and records and not train:  # the file is fine; the split took every record
                raise ConfigError(f"data.val_fraction {self.val_fraction} leaves none of the {len(records)} record(s) "
                                  f"of {self.train_file} for training; lower it or give data.val_file")  # fmt: skip
        self.train_set = self._encode_examples(train, "train")
        self.val_set = self._encode_examples(val, "val") if val else None
        if stage == "fit":
            self._require_a_batch(self.train_set, self.train_file, "training")
        if self.val_file is not None and not self.val_set:
            raise InputError(f"{self.val_file}: no usable validation records{self._rejected_note(self.val_file)}")
        if stage == "validate" and not self.val_set:
            raise ConfigError("nothing to validate: set data.val_file (or data.val_fraction > 0 with data.train_file)")

    def _require_a_batch(self, dataset: EncodedDataset, path: str, what: str) -> None:
        """Refuse to train on less than one batch per device: a run on nothing would take no step and still "finish",
        and a sampler topping a batch up from too few records would silently train on copies."""
        num_replicas, _ = self._replicas()
        need = self.batch_size * num_replicas
        if len(dataset) == 0:
            raise InputError(f"{path}: no usable {what} records{self._rejected_note(path)}")
        if len(dataset) < need:
            devices = f"{num_replicas} device" + ("s" if num_replicas > 1 else "")
            raise InputError(
                f"{path}: {len(dataset)} usable {what} record(s) (after the validation split, if any), fewer than one"
                f" batch (data.batch_size {self.batch_size} x {devices}){self._rejected_note(path)};"
                " lower data.batch_size or add records"
            )

    def _check_max_length(self) -> None:
        """Refuse a ``max_length`` the prompt alone fills: no case text would fit, in fit, validate or predict."""
        empty = len(prompt_ids(self.tokenizer, self.prompt, ""))
        if empty >= self.max_length:
            raise ConfigError(f"data.max_length {self.max_length} is too small: the prompt without any case text is "
                              f"{empty} tokens; raise it")  # fmt: skip

    def _rejected_note(self, path: str) -> str:
        rejects = self._rejects.get(str(path))
        if rejects is None or not rejects.count:
            return ""
        return f" ({rejects.count} rejected, see {rejects.path})"

    def _encode_examples(self, records: list[dict], split: str) -> EncodedDataset:
        examples, trimmed = [], 0
        for r in records:
            try:
                enc = encode_example(
                    self.tokenizer, self.prompt, r["feature_content"], r["diseases"], r["reason"], self.max_length
                )
            except ValueError as e:  # an answer longer than max_length: it must not be cut, so the record can't train
                if self.on_bad_record != "skip":
                    raise BadRecordError(r["_file"], r["_line"], str(e)) from None
                rejects = self._rejects_for(r["_file"])
                rejects.add(r["_file"], r["_line"], str(e), _public(r))
                log.warning("%s:%d: %s — skipped, written to %s", r["_file"], r["_line"], e, rejects.path)
                continue
            trimmed += enc["trimmed"]
            examples.append({**enc, "id": r["id"], "diseases": r["diseases"], "reason": r["reason"]})
            if split == "val":  # validation's sample table shows the case text; training needs only the tokens
                examples[-1]["feature_content"] = r["feature_content"]
        if trimmed:
            log.warning("%s: %d of %d record(s) longer than max_length=%d had their case text trimmed",
                        split, trimmed, len(records), self.max_length)  # fmt: skip
        return EncodedDataset(examples)

    def _encode_prompts(self, records: list[dict]) -> EncodedDataset:
        """Prompts for generation, sorted longest first: batches of similar length pad little, and a too-large batch
        fails at once rather than hours in. ``order`` keeps each record's input position for the writer."""
        examples, trimmed = [], 0
        for order, r in enumerate(records):
            ids, cut = fit_case_text(self.tokenizer, self.prompt, r["feature_content"], self.max_length)
            trimmed += cut
            record = _public(r)
            examples.append({"input_ids": ids, "prompt_len": len(ids), "record": record, "order": order})
        if trimmed:
            log.warning("predict: %d record(s) longer than max_length=%d had their case text trimmed",
                        trimmed, self.max_length)  # fmt: skip
        examples.sort(key=lambda e: len(e["input_ids"]), reverse=True)
        self.predict_order = {e["record"]["id"]: e["order"] for e in examples}
        return EncodedDataset(examples)

    def predict_texts(self) -> dict[Any, str]:
        """``id → feature_content`` of the records still to predict (all of them before :meth:`exclude_predict_ids`)."""
        return {e["record"]["id"]: e["record"]["feature_content"] for e in self.predict_set.examples}

    def exclude_predict_ids(self, done: set) -> int:
        """Drop records whose id is in ``done`` (already predicted, when resuming); returns how many remain."""
        self.predict_set = EncodedDataset([e for e in self.predict_set.examples if e["record"]["id"] not in done])
        return len(self.predict_set)

    # -- loaders ------------------------------------------------------------------------------------------------------

    def _replicas(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_batches(self) -> int:
        """Training batches per process in an epoch (what :class:`LengthGroupedSampler` hands out)."""
        num_replicas, _ = self._replicas()
        return max(1, math.ceil(len(self.train_set) / (self.batch_size * num_replicas)))

    def state_dict(self) -> dict[str, Any]:
        """The train loader's position (:class:`ResumableLoader`) and the layout it means something in
        (:func:`healthai.resume.training_layout`), whenever Lightning writes a checkpoint."""
        if self._train_loader is None:
            return {}
        from healthai.resume import training_layout

        return {**self._train_loader.state_dict(), "layout": training_layout(self, self.trainer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning also restores the loader itself from its fit loop's state, but not when configure_optimizers has
        # built the loader before the checkpoint was read (estimated_stepping_batches; Lightning issue #20550), which
        # is always the case here. This hook runs in every resume, before the first batch is fetched.
        if not state_dict:
            return
        from healthai.resume import check_layout, training_layout

        state_dict = dict(state_dict)
        layout = state_dict.pop("layout", None)
        check_layout(layout, training_layout(self, self.trainer), self.trainer.ckpt_path, self.allow_layout_change)
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state_dict)
        else:
            self._resume = dict(state_dict)  # for the loader train_dataloader() builds next

    def train_dataloader(self) -> ResumableLoader:
        num_replicas, rank = self._replicas()
        sampler = LengthGroupedSampler(
            self.train_set.lengths, self.batch_size, num_replicas, rank, self.seed, self.mega_batch_mult
        )
        loader = ResumableLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=self.train_collator(),
        )  # fmt: skip
        if self._resume is not None:
            loader.load_state_dict(self._resume)
            self._resume = None
        self._train_loader = loader
        return loader

    def train_collator(self) -> TrainCollator | PackingCollator:
        """How training batches are built: padded to their longest record, or packed (``packing``)."""
        if self.packing:
            return PackingCollator(self.tokenizer.pad_token_id, self.max_length, self.pad_to_multiple_of)
        return TrainCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        collate = TrainCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of, with_prompts=True)
        num_replicas, rank = self._replicas()
        return DataLoader(PaddedEvalSet(self.val_set), batch_size=self.eval_batch_size, num_workers=self.num_workers,
                          sampler=EvalSampler(len(self.val_set), num_replicas, rank), collate_fn=collate)  # fmt: skip

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.predict_set, batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=PromptCollator(self.tokenizer.pad_token_id))  # fmt: skip


def _public(record: dict) -> dict:
    """The record as read, without the bookkeeping fields ``_file``/``_line``."""
    return {k: v for k, v in record.items() if k not in ("_file", "_line")}


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train/validation split; the validation share is rounded and at least one record when > 0."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0 or len(records) < 2:
        return records, []
    n_val = max(1, round(len(records) * val_fraction))
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val_idx], [r for i, r in enumerate(records) if i in val_idx]
