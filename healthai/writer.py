"""``DiagnosisWriter``: streams predictions to disk batch by batch, resumes after a crash, merges rank shards.

Each process appends its rows to its own shard ``<output>.rank<R>.jsonl`` (flushed and fsync'ed per batch), so a crash
loses at most the batch being generated. On start, ids already present in the output or in any shard are skipped —
a torn last line left by a kill is cut off and its record redone. At the end rank zero merges everything into the
output file in input order, atomically (temporary file + rename), and removes the shards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.callbacks import BasePredictionWriter

from healthai.jsonl import BadRecordError, append_rows, iter_jsonl, recover_jsonl

SUBMISSION_KEYS = ("id", "reason", "diseases", "feature_content", "parse_status")
"""Key order of a prediction row (the official submission order, plus ``parse_status``)."""


class DiagnosisWriter(BasePredictionWriter):
    """Writes prediction rows to a JSONL file as they are generated, exactly once per input id."""

    def __init__(self, output_path: Optional[str] = None, progress: bool = True):
        """
        Args:
            output_path: Predictions JSONL to write. Rows already in it (or in its ``.rank*.jsonl`` shards from an
                interrupted run) are kept and their ids skipped, so rerunning the same command resumes.
            progress: Show a progress bar of records done and records per second (rank zero).
        """
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path) if output_path is not None else None
        self.progress = progress
        self._shard = None
        self._bar = None

    # -- paths --------------------------------------------------------------------------------------------------------

    def shard_path(self, rank: int) -> Path:
        return self.output_path.with_name(f"{self.output_path.name}.rank{rank}.jsonl")

    def shard_paths(self) -> list[Path]:
        """Every rank's shard, also those of an earlier run with a different number of processes."""
        return sorted(self.output_path.parent.glob(f"{self.output_path.name}.rank*.jsonl"))

    # -- resume -------------------------------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        if self.output_path is None:
            raise ValueError("writer.output_path is not set: where should the predictions go?")
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        # Each rank repairs only its own shard (cutting a torn last line) before anyone reads the others: a rank must
        # never truncate a file another rank may be appending to.
        recover_jsonl(self.shard_path(trainer.global_rank))
        trainer.strategy.barrier("healthai-writer-recover")
        done = self.done_ids()
        trainer.strategy.barrier("healthai-writer-read")
        datamodule = trainer.datamodule
        unknown = done - set(datamodule.predict_order)
        if unknown:
            raise ValueError(
                f"{self.output_path}: holds {len(unknown)} id(s) not in the input (e.g. {sorted(map(str, unknown))[:3]});"
                " is this the output of another input file?"
            )
        todo = datamodule.exclude_predict_ids(done)
        if trainer.is_global_zero and done:
            print(f"resuming {self.output_path}: {len(done)} record(s) already done, {todo} to go", flush=True)
        self._open(trainer, todo)

    def done_ids(self) -> set:
        """Ids already written to the output file or to any shard (read only)."""
        done: set = set()
        for path in [self.output_path, *self.shard_paths()]:
            if path.exists():
                done.update(_ids_in(path))
        return done

    def _open(self, trainer, todo: int) -> None:
        self._shard = open(self.shard_path(trainer.global_rank), "a", encoding="utf-8")
        if self.progress and trainer.is_global_zero:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=todo, unit="rec", desc="predict", dynamic_ncols=True)

    # -- writing ------------------------------------------------------------------------------------------------------

    def write_on_batch_end(self, trainer, pl_module, prediction: Sequence[dict], batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:  # fmt: skip
        append_rows(self._shard, (submission_row(r) for r in prediction))
        if self._bar is not None:
            # Ranks advance in step, so rank zero's count times the world size tracks the whole job.
            self._bar.update(len(prediction) * trainer.world_size)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._close()
        trainer.strategy.barrier("healthai-writer-merge")
        if trainer.is_global_zero:
            n = self.merge(trainer.datamodule.predict_order)
            print(f"wrote {n} prediction(s) to {self.output_path}", flush=True)
        trainer.strategy.barrier("healthai-writer-done")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()  # also on an exception: what was written stays on disk for the rerun

    def _close(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def merge(self, order: dict[Any, int]) -> int:
        """Merge the output file and every shard into the output, in input order; atomic; removes the shards."""
        rows: dict[Any, dict] = {}
        shards = self.shard_paths()
        for path in [self.output_path, *shards]:
            if not path.exists():
                continue
            for line_no, row, error in iter_jsonl(path):
                if error is not None:
                    raise BadRecordError(path, line_no, error)
                rows.setdefault(row["id"], row)  # an id is written once; keep the first if a rerun raced
        tmp = self.output_path.with_name(f".{self.output_path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            append_rows(f, (rows[i] for i in sorted(rows, key=lambda i: order.get(i, len(order)))))
        os.replace(tmp, self.output_path)
        for path in shards:
            path.unlink()
        return len(rows)


def submission_row(row: dict) -> dict:
    """The row in submission key order; ``raw_output`` (failed parses) after; bookkeeping keys (``_order``) dropped."""
    out = {k: row[k] for k in SUBMISSION_KEYS}
    if "raw_output" in row:
        out["raw_output"] = row["raw_output"]
    return out


def _ids_in(path: Path) -> list:
    """Ids of the rows of a file that its writer has already repaired (see ``DiagnosisWriter.setup``)."""
    ids = []
    for line_no, row, error in iter_jsonl(path):
        if error is None and "id" not in row:
            error = "row without 'id'"
        if error is not None:
            raise BadRecordError(path, line_no, f"cannot resume from this file: {error}")
        ids.append(row["id"])
    return ids
