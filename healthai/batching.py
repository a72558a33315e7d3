"""Token batches: dynamic padding (:func:`pad_batch` and the collators), the length-grouped training sampler, the
validation sampler that keeps the ranks in step, and the training loader that resumes at the exact batch.

Everything here takes examples already encoded by :mod:`healthai.encoding`; :class:`healthai.data.DiagnosisDataModule`
puts them together.
"""

from __future__ import annotations

import math
import random
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from healthai.encoding import IGNORE_INDEX


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


class PackingCollator:
    """Padding-free training batches: the micro-batch's records concatenated into rows of at most ``max_length``
    tokens (:meth:`rows`), ``position_ids`` restarting at 0 at each record, labels as each record has them.

    No attention mask is passed: transformers reads the restarts in ``position_ids`` as sequence boundaries (a
    block-diagonal causal mask for sdpa and eager, per-sequence lengths for flash-attention), so no token attends to
    another record. A row shorter than the longest is filled with pad tokens that form a sequence of their own
    (positions from 0, labels −100): nothing attends to them and they add nothing to the loss. ``attention_mask``
    is still in the batch, 1 on real tokens, for the padding statistics; the model does not read it.
    """

    def __init__(self, pad_id: int, max_length: int, pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.max_length = max_length
        self.multiple_of = pad_to_multiple_of

    def rows(self, lengths: Sequence[int]) -> list[list[int]]:
        """Which examples (indices into ``lengths``) share a row: as few rows as ``max_length`` allows, balanced
        (longest first, each to the row with the most room) so that the rows are padded to little: the batch computes
        about its real tokens, where first-fit would leave one full row and one short one. Never more tokens than
        padding the batch would compute."""
        total = sum(lengths)
        for count in range(max(1, math.ceil(total / self.max_length)), len(lengths) + 1):
            rows: list[list[int]] = [[] for _ in range(count)]
            filled = [0] * count
            for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
                row = min(range(count), key=filled.__getitem__)
                if filled[row] + lengths[i] > self.max_length:
                    break
                rows[row].append(i)
                filled[row] += lengths[i]
            else:
                rows = [row for row in rows if row]
                break
        else:
            rows = [[i] for i in range(len(lengths))]
        width = max(sum(lengths[i] for i in row) for row in rows)
        # Rows of uneven sums can cost more than padding the records themselves (which the length-grouped sampler
        # keeps to a few %): then each record keeps a row of its own.
        if len(rows) * width > len(lengths) * max(lengths):
            return [[i] for i in range(len(lengths))]
        return rows

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = self.rows([len(e["input_ids"]) for e in examples])
        ids, labels, positions = [], [], []
        for row in rows:
            ids.append([t for i in row for t in examples[i]["input_ids"]])
            labels.append([t for i in row for t in examples[i]["labels"]])
            positions.append([p for i in row for p in range(len(examples[i]["input_ids"]))])
        width = math.ceil(max(len(r) for r in ids) / self.multiple_of) * self.multiple_of
        for row_ids, row_labels, row_positions in zip(ids, labels, positions):
            fill = width - len(row_ids)
            row_ids += [self.pad_id] * fill
            row_labels += [IGNORE_INDEX] * fill
            row_positions += list(range(fill))  # a sequence of its own: its first position restarts at 0
        real = [[1] * sum(len(examples[i]["input_ids"]) for i in row) for row in rows]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "attention_mask": pad_batch(real, 0, "right", self.multiple_of),
        }


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
