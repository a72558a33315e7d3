"""Case records in, token batches out: validated JSONL reading, tokenisation with the loss mask, dynamic padding and a
length-grouped sampler, wrapped in :class:`DiagnosisDataModule`."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from healthai.errors import ConfigError, InputError, UserError, check_at_least, check_model_source
from healthai.jsonl import BadRecordError, OnBadRecord, Rejects, rejects_path_for
from healthai.prompts import PromptStyle, answer_text, join_diseases
from healthai.records import check_record, id_key, read_records  # noqa: F401  (re-exported: the data stage's API)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that the loss skips (prompt, padding)."""

END_OF_TURN = "<|im_end|>"
"""ChatML's end-of-turn token: the last token the model learns to write, and the token generation stops at."""


# --------------------------------------------------------------------------------------------------------------------
# Tokenisation: one truth for the loss mask
# --------------------------------------------------------------------------------------------------------------------


def end_of_turn_id(tokenizer) -> int:
    """Id of the chat template's end-of-turn token."""
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if eot is None or eot == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {END_OF_TURN} token; a ChatML (Qwen) tokenizer is required")
    return eot


def prompt_ids(tokenizer, prompt: PromptStyle, case_text: str) -> list[int]:
    """Token ids of the chat up to and including the assistant header (``<|im_start|>assistant\\n``)."""
    ids = tokenizer.apply_chat_template(prompt.messages(case_text), tokenize=True, add_generation_prompt=True)
    # transformers v5 returns a BatchEncoding here, v4 a list.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def fit_case_text(tokenizer, prompt: PromptStyle, case_text: str, budget: int) -> tuple[list[int], bool]:
    """Prompt ids for ``case_text``, trimming the case text's tail until the prompt has at most ``budget`` tokens.

    Returns ``(ids, trimmed)``. Trimming is by characters (binary search), never by cutting token ids, so the kept text
    re-tokenises exactly as the model will see it at inference. Raises ValueError if even an empty case text does not
    fit.
    """
    ids = prompt_ids(tokenizer, prompt, case_text)
    if len(ids) <= budget:
        return ids, False
    best = prompt_ids(tokenizer, prompt, "")
    if len(best) > budget:
        raise ValueError(f"the prompt alone needs more than {budget} tokens; raise max_length")
    lo, hi = 0, len(case_text)  # lo chars always fit, hi chars do not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cand = prompt_ids(tokenizer, prompt, case_text[:mid])
        if len(cand) <= budget:
            lo, best = mid, cand
        else:
            hi = mid
    return best, True


def encode_example(
    tokenizer, prompt: PromptStyle, case_text: str, diseases: str, reason: str, max_length: int
) -> dict[str, Any]:
    """Tokenise one training example: ``input_ids``, ``labels`` (−100 except the answer and end-of-turn tokens),
    ``prompt_len`` and ``trimmed``.

    The answer is never cut: when the example is too long, the case text is trimmed (:func:`fit_case_text`).
    """
    answer = tokenizer(answer_text(diseases, reason), add_special_tokens=False)["input_ids"]
    answer = list(answer) + [end_of_turn_id(tokenizer)]
    budget = max_length - len(answer)
    if budget <= 0:
        raise ValueError(f"the answer alone is {len(answer)} tokens, over max_length={max_length}")
    ids, trimmed = fit_case_text(tokenizer, prompt, case_text, budget)
    return {
        "input_ids": ids + answer,
        "labels": [IGNORE_INDEX] * len(ids) + answer,
        "prompt_len": len(ids),
        "trimmed": trimmed,
    }


class EncodedDataset(Dataset):
    """Examples tokenised once, up front (records are short; re-tokenising every epoch would waste CPU)."""

    def __init__(self, examples: list[dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]


# --------------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------------


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_value: int, side: Literal["right", "left"], multiple_of: int = 1
) -> torch.Tensor:
    """Stack ``sequences`` into one tensor padded to the longest (rounded up to ``multiple_of``)."""
    width = max(len(s) for s in sequences)
    width = math.ceil(width / multiple_of) * multiple_of
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if side == "right":
            out[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        else:
            out[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
    return out


class TrainCollator:
    """Right-pads a batch to its longest sequence: pad id in ``input_ids``, −100 in ``labels``, 0 in ``attention_mask``.

    With ``with_prompts`` (validation) it also passes the prompts left-padded (``prompt_ids``, ``prompt_mask``) and the
    references, for validation generation.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1, with_prompts: bool = False):
        self.pad_id = pad_id
        self.multiple_of = pad_to_multiple_of
        self.with_prompts = with_prompts

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [e["input_ids"] for e in examples]
        batch: dict[str, Any] = {
            "input_ids": pad_batch(ids, self.pad_id, "right", self.multiple_of),
            "labels": pad_batch([e["labels"] for e in examples], IGNORE_INDEX, "right", self.multiple_of),
            "attention_mask": pad_batch([[1] * len(s) for s in ids], 0, "right", self.multiple_of),
        }
        if self.with_prompts:
            prompts = [e["input_ids"][: e["prompt_len"]] for e in examples]
            batch["prompt_ids"] = pad_batch(prompts, self.pad_id, "left")
            batch["prompt_mask"] = pad_batch([[1] * len(p) for p in prompts], 0, "left")
            batch["ids"] = [e["id"] for e in examples]
            batch["references"] = [{"diseases": e["diseases"], "reason": e["reason"]} for e in examples]
            batch["case_texts"] = [e["feature_content"] for e in examples]  # the sample table in TensorBoard
            # Records repeated only to give every process as many batches (EvalSampler): not counted in metrics.
            batch["repeat"] = torch.tensor([bool(e.get("repeat")) for e in examples])
        return batch


class PromptCollator:
    """Left-pads prompts for batched generation (so every row's next token sits in the last column)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [e["input_ids"][: e["prompt_len"]] for e in examples]
        return {
            "input_ids": pad_batch(ids, self.pad_id, "left"),
            "attention_mask": pad_batch([[1] * len(s) for s in ids], 0, "left"),
            "records": [e["record"] for e in examples],
            "order": [e["order"] for e in examples],
        }


class LengthGroupedSampler(DistributedSampler):
    """Shuffled mega-batches, each sorted by length, cut into batches whose order is shuffled again.

    Sequences of similar length share a batch, so dynamic padding adds little, while the epoch stays random. It is a
    ``DistributedSampler`` (Lightning then leaves it in place and calls :meth:`set_epoch`): every rank draws the same
    global order from ``seed + epoch`` and takes its share of each global batch, so ranks see disjoint data and the
    same number of batches. Within a global batch (sorted longest first) rank ``r`` takes positions ``r, r + R, …``:
    the longest sequences are spread over the ranks instead of all landing on rank 0, which the others would wait
    for. The epoch's longest global batch comes first, so a batch too large for the GPU fails in the first minute,
    not hours in. When the dataset does not fill ``batch_size × num_replicas × batches``, the epoch's order is
    repeated to fill it (as ``DistributedSampler`` pads), however few records there are.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        mega_batch_mult: int = 50,
        shuffle: bool = True,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if not lengths:
            raise ValueError("no training examples")
        # DistributedSampler.__init__ would query torch.distributed; set its fields directly instead.
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.shuffle = shuffle
        self.mega_batch_mult = mega_batch_mult
        self.start_batch = 0
        """Batches of the epoch to skip at the next iteration (set by :class:`ResumableLoader` when resuming)."""
        global_batch = batch_size * num_replicas
        self.num_batches = max(1, math.ceil(len(self.lengths) / global_batch))
        self.num_samples = self.num_batches * batch_size
        self.total_size = self.num_samples * num_replicas
        self.drop_last = False

    def global_batches(self) -> list[list[int]]:
        """The epoch's batches over all ranks, each ``batch_size × num_replicas`` indices of similar length, longest
        first within a batch, and the batch holding the epoch's longest sequence first."""
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        order = (order * math.ceil(self.total_size / len(order)))[: self.total_size]  # every rank gets full batches
        global_batch = self.batch_size * self.num_replicas
        mega = global_batch * self.mega_batch_mult
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[j : j + global_batch] for j in range(0, len(chunk), global_batch)]
        if self.shuffle:
            rng.shuffle(batches)
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
        batches.insert(0, batches.pop(longest))
        return batches

    def __iter__(self) -> Iterator[int]:
        start, self.start_batch = self.start_batch, 0  # only the iteration right after a resume skips
        for batch in self.global_batches()[start:]:
            yield from batch[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return self.num_samples


class PaddedEvalSet(Dataset):
    """A dataset indexed past its end by :class:`EvalSampler`: position ``len + k`` is record ``k`` again, marked
    ``repeat`` so that validation leaves it out of its metrics."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.dataset)
        return self.dataset[i] if i < n else {**self.dataset[i % n], "repeat": True}


class EvalSampler(DistributedSampler):
    """Validation's share of each process, in dataset order: rank ``r`` takes positions ``r, r + R, …`` as
    ``DistributedSampler(shuffle=False)`` does, and the last round is padded so every rank runs as many batches (the
    ranks must stay in step); the padding positions lie past the dataset's end, so :class:`PaddedEvalSet` marks them as
    repeats instead of passing them off as more records. A ``DistributedSampler``, so Lightning keeps it."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0):
        # DistributedSampler.__init__ would query torch.distributed; set its fields directly instead.
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.seed, self.shuffle, self.drop_last = 0, 0, False, False
        self.num_samples = math.ceil(size / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """The training ``DataLoader``, resumable at the exact batch: Lightning saves its :meth:`state_dict` (the epoch and
    the batches handed out in it) in every checkpoint, and after :meth:`load_state_dict` the next iteration of that
    epoch starts at the following batch; its sampler (a :class:`LengthGroupedSampler`) skips the batches before it
    without loading them.

    Batches are counted as they are handed out, which is when Lightning trains on them: Lightning prefetches nothing
    from a loader whose length is known, and worker processes' prefetching is invisible here.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._position = {"epoch": 0, "batches": 0}
        self._resume: Optional[dict[str, int]] = None

    def state_dict(self) -> dict[str, int]:
        return dict(self._position)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing starts (no sampler, no worker) until the first batch is asked for. Lightning creates
        # the iterator before it restores a checkpoint when configure_optimizers asks for estimated_stepping_batches
        # (Lightning issue #20550), so the resume position must be read only then.
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        epoch = self.sampler.epoch
        skip = 0
        if self._resume is not None:
            skip = self._resume["batches"] if self._resume["epoch"] == epoch else 0
            self._resume = None
        self.sampler.start_batch = skip
        self._position = {"epoch": epoch, "batches": skip}
        for batch in super().__iter__():
            self._position["batches"] += 1
            yield batch


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
        max_length: int = 2048,
        batch_size: int = 4,
        eval_batch_size: Optional[int] = None,
        val_fraction: float = 0.05,
        seed: int = 42,
        on_bad_record: OnBadRecord = "error",
        pad_to_multiple_of: int = 1,
        mega_batch_mult: int = 50,
        num_workers: int = 0,
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
                prompt settings (``prompt.json``) are used, so training and prediction prompts cannot drift.
            prompt: Prompt settings (system message, user template). Default: :class:`~healthai.prompts.PromptStyle`.
            max_length: Longest tokenised example (prompt + answer) in fit, and longest prompt in predict. Longer
                records have their case text trimmed — never the answer; the count is logged.
            batch_size: Training micro-batch size per device.
            eval_batch_size: Batch size for validation and predict (default: ``batch_size``).
            val_fraction: Share of ``train_file`` held out for validation when no ``val_file`` is given (0 = none).
            seed: Seed of the train/validation split and the sampler's shuffling.
            on_bad_record: ``error`` stops with ``file:line`` and the reason; ``skip`` writes the record and reason to
                ``<file>.rejects.jsonl`` and goes on.
            pad_to_multiple_of: Round padded lengths up to a multiple of this (8 helps tensor cores on GPU).
            mega_batch_mult: Mega-batch size, in global batches, within which the sampler sorts by length. Larger =
                less padding, less randomness.
            num_workers: DataLoader worker processes.
            allow_layout_change: On ``fit --ckpt_path``, accept a checkpoint written in another training layout
                (number of processes, batch size, accumulation, sampler settings, seed, training or validation
                records): the epoch's order is drawn again in this layout and the run goes on at the checkpoint's
                batch count, so that epoch may repeat or miss records (later epochs are whole). By default such a
                resume is refused naming the change.
        """
        # A bad value is the user's config error, named here, not a ZeroDivisionError deep in a sampler.
        check_at_least("data.max_length", max_length, 1)
        check_at_least("data.batch_size", batch_size, 1)
        check_at_least("data.eval_batch_size", eval_batch_size, 1, allow_none=True)
        check_at_least("data.pad_to_multiple_of", pad_to_multiple_of, 1)
        check_at_least("data.mega_batch_mult", mega_batch_mult, 1)
        check_at_least("data.num_workers", num_workers, 0)
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
        if tokenizer_path is not None:
            check_model_source(tokenizer_path, "data.tokenizer_path")
        super().__init__()
        self.save_hyperparameters(ignore=["prompt"])
        self.train_file, self.val_file, self.predict_file = train_file, val_file, predict_file
        self.tokenizer_path = tokenizer_path
        self.adapter_path = adapter_path
        self.prompt = self._resolve_prompt(prompt, adapter_path)
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.on_bad_record = on_bad_record
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mega_batch_mult = mega_batch_mult
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
    def _resolve_prompt(prompt: Optional[PromptStyle], adapter_path: Optional[str]) -> PromptStyle:
        if adapter_path is None:
            return prompt or PromptStyle()
        from healthai.adapter import check_adapter_path, load_prompt

        saved = load_prompt(check_adapter_path(adapter_path))  # a folder's prompt.json, or a fit .ckpt's record
        if prompt is not None and prompt != saved:
            log.warning("prompt settings given in the config differ from %s's; using the adapter's", adapter_path)
        return saved

    # -- set-up -------------------------------------------------------------------------------------------------------

    def load_tokenizer(self):
        """The tokenizer: the adapter's copy if it has one (saved by fit), else ``tokenizer_path``'s."""
        from transformers import AutoTokenizer

        from healthai.adapter import resolve_base, tokenizer_source

        base = self.tokenizer_path
        if base is not None and self.adapter_path is not None:  # found from another working directory too
            base = resolve_base(base, self.adapter_path, "--model.model_name_or_path")
        source = tokenizer_source(self.adapter_path, base)
        if source is None:
            raise ConfigError("data.tokenizer_path is not set (the CLI links it from model.model_name_or_path)")
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
            train, val = records, self._read(self.val_file, "val_file", labelled=True)
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
            collate_fn=TrainCollator(self.tokenizer.pad_token_id, self.pad_to_multiple_of),
        )  # fmt: skip
        if self._resume is not None:
            loader.load_state_dict(self._resume)
            self._resume = None
        self._train_loader = loader
        return loader

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


# Refuse rather than derive caps from the data: the check runs before the base is loaded, so a refusal costs seconds,
# not the hours of a 7B run; caps grown silently to a runaway teacher label (a 2,000-character reason) would raise
# every answer's token budget and make the adapter override predict's settings, a second, hidden source of decoding
# settings. Refused, the user picks: raise the caps (in the fit and the predict config) or fix those labels.
def check_answer_caps(splits: dict[str, Optional[EncodedDataset]], max_diseases_chars: Optional[int],
                      max_reason_chars: Optional[int]) -> None:  # fmt: skip
    """Refuse (:class:`~healthai.errors.UserError`, one line) labels that the length-capped JSON constraint could not
    write back: a field at or over its cap (a generated field that reaches its cap is reported ``truncated``), or
    holding a character a capped string cannot hold (:data:`healthai.decoding.CAPPED_UNWRITABLE`: a quote, a
    backslash, a newline or another control character). The model would learn answers it is not allowed to finish,
    and validation would score it against references it cannot reach. ``splits`` maps a split's name to its encoded
    examples (``None`` = no such split); a ``None`` cap is unbounded (and allows escapes)."""
    from healthai.decoding import CAPPED_UNWRITABLE

    caps = {"diseases": max_diseases_chars, "reason": max_reason_chars}
    problems = []
    for split, dataset in splits.items():
        if dataset is None:
            continue
        bad_ids, longest, n_over, unwritable = set(), {}, {}, []
        for example in dataset.examples:
            for key, cap in caps.items():
                if cap is None:
                    continue
                value = join_diseases(example[key]) if key == "diseases" else example[key]
                if len(value) >= cap:
                    bad_ids.add(id_key(example["id"]))
                    n_over[key] = n_over.get(key, 0) + 1
                    if len(value) > longest.get(key, (-1, None))[0]:
                        longest[key] = (len(value), example["id"])
                if CAPPED_UNWRITABLE.search(value):
                    bad_ids.add(id_key(example["id"]))
                    unwritable.append((example["id"], key))
        if not bad_ids:
            continue
        parts = [f"{n_over[key]} with {key} of {caps[key]}+ characters (model.generation.max_{key}_chars {caps[key]};"
                 f" longest {longest[key][0]}, id {longest[key][1]!r})" for key in caps if key in n_over]  # fmt: skip
        if unwritable:
            rid, key = unwritable[0]
            parts.append(f"{len(unwritable)} field(s) holding a quote, backslash, newline or other control character, "
                         f"which a capped string cannot hold (e.g. id {rid!r}, {key})")  # fmt: skip
        problems.append(f"{len(bad_ids)} of {len(dataset)} {split} label(s) cannot be written under the answer caps: "
                        + ", ".join(parts))  # fmt: skip
    if problems:
        fix = ("raise the caps above the longest label (in this config and predict's; max_new_tokens must hold them) "
               "or set them to null (uncapped strings allow escapes), or fix those labels")  # fmt: skip
        raise UserError("; ".join(problems) + f"; the model would learn answers it may not finish: {fix}")


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
