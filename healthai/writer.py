"""``DiagnosisWriter``: streams predictions to disk batch by batch, resumes after a crash, merges rank shards, and
records what produced the rows.

Each process appends its rows to its own shard ``<output>.rank<R>.jsonl`` (flushed and fsync'ed per batch), so a crash
loses at most the batch being generated. On start, ids already present in the output or in any shard are skipped —
a torn last line left by a kill is cut off and its record redone. When every input id is done, rank zero merges
everything into the output file in input order, atomically (temporary file + rename), and removes the shards; a
complete set of shards left by a crash before the merge is merged by the next run.

Provenance: ``<output>.meta.json`` records what produced the rows (input file, base model, adapter, prompt and
decoding settings, package versions). A rerun resumes only when the base, adapter, prompt and decoding settings are
those of the meta file and every row already written has the ``feature_content`` of the input record with its id;
anything else stops with one line naming what differs (``--writer.overwrite true`` starts over). The input *file* may
change between runs (records appended, the file rewritten): rows are checked one by one against it, which is what
matters, so a grown input resumes. Package versions and whether the LoRA layers were merged for generation are
recorded, and a change is only reported: it moves floating point results the way another GPU does, not which model or
settings produced a row.

SIGTERM (a scheduler's stop) and SIGINT (Ctrl+C) stop the run at the next batch boundary: the batch being generated is
finished and written, the run prints how to resume and exits with 143 / 130.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch.callbacks import BasePredictionWriter

from healthai.argv import command_without
from healthai.atomic import atomic_open, write_text
from healthai.errors import UserError, check_output, one_line
from healthai.jsonl import BadRecordError, append_rows, iter_jsonl, recover_jsonl
from healthai.output_lock import OutputLock, lock_on_rank_zero
from healthai.paths import check_writable
from healthai.provenance import base_fingerprint, package_versions, sha256_file
from healthai.records import id_key
from healthai.resume import ResumeRefused
from healthai.shared_folder import check_shared

SUBMISSION_KEYS = ("id", "reason", "diseases", "feature_content", "parse_status")
"""Key order of a prediction row (the official submission order, plus ``parse_status``)."""

PACKAGES = ("healthai", "torch", "transformers", "peft", "xgrammar", "lightning")
"""Distributions whose versions the meta file records."""

SAMPLING_ONLY = ("temperature", "top_p")
"""Generation settings that greedy decoding ignores: changing them does not change greedy rows."""

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}
"""Exit status after a stop signal: 128 + the signal's number, as a shell reports a process that signal ended."""


class DiagnosisWriter(BasePredictionWriter):
    """Writes prediction rows to a JSONL file as they are generated, exactly once per input id."""

    def __init__(self, output_path: Optional[str] = None, progress: bool = True, overwrite: bool = False):
        """
        Args:
            output_path: Predictions JSONL to write. Rows already in it (or in its ``.rank*.jsonl`` shards from an
                interrupted run) are kept and their ids skipped, so rerunning the same command resumes — provided
                ``<output>.meta.json`` shows the same base model, adapter, prompt and generation settings, and each
                kept row's ``feature_content`` is the input's; otherwise the run stops and says what differs.
            progress: Show a progress bar of records done and records per second (rank zero).
            overwrite: Start over: remove the output, its shards and its meta file first, instead of resuming.
        """
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path) if output_path is not None else None
        self.progress = progress
        self.overwrite = overwrite
        self._shard = None
        self._bar = None
        self._stop_signal: Optional[int] = None
        self._old_sigint = None
        self._run: Optional[dict[str, Any]] = None
        self._lock: Optional[OutputLock] = None

    # -- paths --------------------------------------------------------------------------------------------------------

    def shard_path(self, rank: int) -> Path:
        return self.output_path.with_name(f"{self.output_path.name}.rank{rank}.jsonl")

    def shard_paths(self) -> list[Path]:
        """Every rank's shard, also those of an earlier run with a different number of processes."""
        return sorted(self.output_path.parent.glob(f"{self.output_path.name}.rank*.jsonl"))

    @property
    def meta_path(self) -> Path:
        """``<output>.meta.json``: what produced the rows of the output and its shards."""
        return self.output_path.with_name(f"{self.output_path.name}.meta.json")

    # -- resume -------------------------------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        # Lightning calls this before the model loads: every refusal here costs the user seconds, not a base load.
        if self.output_path is None:
            raise UserError("writer.output_path is not set: where should the predictions go?")
        datamodule = trainer.datamodule
        self._check_writable()
        check_shared(self.output_path.parent, trainer.strategy, "--writer.output_path")  # the shards meet there
        self._refuse_input_as_output(datamodule.predict_file)
        # One process group per output (#29 item 3): before the overwrite removes anything or any output is read.
        self._lock = lock_on_rank_zero(trainer, self.output_path, "--writer.output_path")
        if self.overwrite and trainer.is_global_zero:
            self.remove_outputs()
        trainer.strategy.barrier("healthai-writer-overwrite")
        # Rank zero repairs every shard (cutting a torn last line) before anyone reads them: the shards of an earlier
        # run with any number of processes, so that any number resumes them. No process of this run appends yet.
        if trainer.is_global_zero:
            for shard in self.shard_paths():
                recover_jsonl(shard)
                if shard.stat().st_size == 0:
                    shard.unlink()  # a shard whose only line was torn holds nothing: no empty file left behind
        trainer.strategy.barrier("healthai-writer-recover")
        done = self.done_rows()
        trainer.strategy.barrier("healthai-writer-read")
        run = describe_run(datamodule, pl_module)
        notes = self._check_resume(done, datamodule, run)
        if trainer.is_global_zero:
            for note in notes:
                print(f"note: {note}", flush=True)
        self._run = run  # written to the meta file before the first row (and at the merge), not before: no litter
        todo = datamodule.exclude_predict_ids({i for i in datamodule.predict_order if id_key(i) in done})
        if trainer.is_global_zero and done:
            print(f"resuming {self.output_path}: {len(done)} record(s) already done, {todo} to go", flush=True)
        if todo == 0:
            # Nothing to generate, so Lightning runs no predict loop (and no on_predict_end): merge here what an
            # earlier run left — shards complete but never merged after a crash, or an empty input.
            self._finish(trainer)
        elif self.progress and trainer.is_global_zero:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=todo, unit="rec", desc="predict", dynamic_ncols=True)

    def _refuse_input_as_output(self, predict_file: Optional[str]) -> None:
        """The one output rule (:func:`healthai.errors.check_output`) for every file this writer writes: the output,
        its meta file and each rank's shard."""
        if predict_file is None:
            return
        for path in (self.output_path, self.meta_path, *self.shard_paths(), self.shard_path(0)):
            option = "--writer.output_path" + ("" if path == self.output_path else f" ({path.name})")
            check_output(option, path, {"--data.predict_file": predict_file})

    def _check_writable(self) -> None:
        """Refuse an output path that is a folder, or in a folder that cannot be created or written (a read-only
        disk), before the model loads and a batch is generated."""
        out = self.output_path
        if out.is_dir():
            raise UserError(f"--writer.output_path {out} is a directory; name a file, e.g. {out / 'predictions.jsonl'}")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--writer.output_path {out}: cannot write in {out.parent} ({e.strerror or e})") from None
        check_writable("--writer.output_path", out)  # the probe every command makes (healthai.paths)

    def remove_outputs(self) -> None:
        """Delete the output, its shards and its meta file (``overwrite``)."""
        for path in [self.output_path, *self.shard_paths(), self.meta_path]:
            path.unlink(missing_ok=True)

    def done_rows(self) -> dict[str, str]:
        """``id_key(id) → feature_content`` of the rows already written to the output file or to any shard (read
        only); ids are compared by :func:`healthai.records.id_key` (``5`` and ``"5"`` are one record)."""
        done: dict[str, str] = {}
        for path in [self.output_path, *self.shard_paths()]:
            if path.exists():
                done.update(_rows_in(path))
        return done

    def _check_resume(self, done: dict[Any, str], datamodule, run: dict[str, Any]) -> list[str]:
        """Refuse to add rows to ``done`` unless they were produced from this input, model and settings; returns
        notes on what changed without mattering (package versions, the input file beyond the rows done)."""
        if not done:
            return []
        start_over = "rerun with --writer.overwrite true to start over, or choose another --writer.output_path"
        texts = {id_key(i): text for i, text in datamodule.predict_texts().items()}
        unknown = set(done) - set(texts)
        if unknown:
            raise ResumeRefused(
                f"{self.output_path}: holds {len(unknown)} id(s) not in the input (e.g."
                f" {sorted(map(str, unknown))[:3]}); is this the output of another input file? {start_over}"
            )
        changed = [i for i, text in done.items() if texts[i] != text]
        if changed:
            raise ResumeRefused(
                f"{self.output_path}: {len(changed)} of {len(done)} row(s) already written have another feature_content"
                f" than {datamodule.predict_file} (e.g. id {changed[0]!r}): they were predicted from another input;"
                f" {start_over}"
            )
        if not self.meta_path.is_file():
            raise ResumeRefused(
                f"{self.output_path}: holds {len(done)} row(s) but no {self.meta_path.name} recording what produced"
                f" them, so resuming could mix models or settings; {start_over}"
            )
        try:
            old = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ResumeRefused(f"{self.meta_path}: unreadable ({one_line(e)}); {start_over}") from None
        try:
            if not isinstance(old, dict):
                raise TypeError(f"a JSON {type(old).__name__}")
            differences = compare_runs(old, run)
            notes = [
                f"{self.output_path} was started with {name} {old['packages'][name]}, this run has {version}"
                for name, version in run["packages"].items()
                if (old.get("packages") or {}).get(name, version) != version
            ]
            merged = merge_note(old, run, self.output_path)
            notes += [merged] if merged else []
            input_changed = (old.get("input") or {}).get("sha256") != run["input"]["sha256"]
        except (AttributeError, TypeError, KeyError) as e:  # valid JSON of another shape: hand-edited or foreign
            raise ResumeRefused(
                f"{self.meta_path}: not the record of a predict run ({one_line(e)}); {start_over}"
            ) from None
        if differences:
            raise ResumeRefused(
                f"{self.output_path}: its {len(done)} row(s) were written with other settings ("
                + "; ".join(differences) + f"); {start_over}"
            )
        if input_changed:
            notes.append(f"{datamodule.predict_file} changed since {self.output_path} was started; the {len(done)} "
                         "row(s) already written still match it by id and feature_content, so they are kept")
        return notes

    def _write_meta(self, run: dict[str, Any]) -> None:
        """Write the meta file atomically (a temporary file per process, fsync'ed, then a rename)."""
        write_text(self.meta_path, json.dumps(run, ensure_ascii=False, indent=2) + "\n")

    # -- writing ------------------------------------------------------------------------------------------------------

    def on_predict_start(self, trainer, pl_module) -> None:
        # SIGTERM: Lightning's own handler (registered just before the loop) sets trainer.received_sigterm. SIGINT is
        # caught here so that Ctrl+C also ends at a batch boundary; a second Ctrl+C interrupts at once.
        self._stop_signal = None
        self._old_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        self._stop_signal = signal.SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\ninterrupted: finishing the current batch (press Ctrl+C again to stop at once)", file=sys.stderr,
              flush=True)  # fmt: skip

    def write_on_batch_end(self, trainer, pl_module, prediction: Sequence[dict], batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:  # fmt: skip
        if self._shard is None:  # opened on the first row, so that a run that writes nothing leaves no empty shard
            self._write_meta(self._run)  # by every rank (same content, atomic): no row is ever on disk without it
            self._shard = open(self.shard_path(trainer.global_rank), "a", encoding="utf-8")
        append_rows(self._shard, (submission_row(r) for r in prediction))
        if self._bar is not None:
            # Ranks advance in step, so rank zero's count times the world size tracks the whole job.
            self._bar.update(len(prediction) * trainer.world_size)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        signum = signal.SIGTERM if trainer.received_sigterm else self._stop_signal
        if signum is not None and not trainer.predict_loop.batch_progress.is_last_batch:
            self._stop(trainer, signum)

    def _stop(self, trainer, signum: int) -> None:
        """End the run at this batch boundary: every row so far is on disk (fsync'ed per batch)."""
        self._close()
        name = signal.Signals(signum).name
        # Resuming must not start over: the hint drops --writer.overwrite from the command.
        how = "rerun the same command without writer.overwrite" if self.overwrite else "rerun the same command"
        print(f"stopped by {name}: the rows written so far are kept in {self.shard_path(trainer.global_rank)}; "
              f"{how} to resume: {_resume_command()}", file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(EXIT_CODES[signum])

    def on_predict_end(self, trainer, pl_module) -> None:
        self._close()
        self._finish(trainer)

    def _finish(self, trainer) -> None:
        trainer.strategy.barrier("healthai-writer-merge")
        if trainer.is_global_zero:
            self._write_meta(self._run)
            n = self.merge(trainer.datamodule.predict_order)
            print(f"wrote {n} prediction(s) to {self.output_path}{status_summary(self.output_path)}", flush=True)
        trainer.strategy.barrier("healthai-writer-done")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()  # what was written stays on disk (fsync'ed) for the rerun
        self._release_lock()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()
        self._release_lock()

    def _release_lock(self) -> None:
        """The next run may have the output (after the merge: teardown, or the exception that ends the run)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _close(self) -> None:
        if self._old_sigint is not None:
            signal.signal(signal.SIGINT, self._old_sigint)
            self._old_sigint = None
        if self._shard is not None:
            self._shard.close()
            self._shard = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def merge(self, order: dict[Any, int]) -> int:
        """Merge the output file and every shard into the output, in input order; atomic; removes the shards."""
        rows: dict[str, dict] = {}
        given = {id_key(i): i for i in order}  # each id as the input writes it (a kept row may have had 5 for "5")
        order = {id_key(i): n for i, n in order.items()}
        shards = self.shard_paths()
        for path in [self.output_path, *shards]:
            if not path.exists():
                continue
            for line_no, row, error in iter_jsonl(path):
                if error is not None:
                    raise BadRecordError(path, line_no, error)
                rows.setdefault(id_key(row["id"]), row)  # an id is written once; keep the first if a rerun raced
        with atomic_open(self.output_path, "w") as f:
            ordered = sorted(rows, key=lambda i: order.get(i, len(order)))
            append_rows(f, ({**rows[i], "id": given.get(i, rows[i]["id"])} for i in ordered))
        for path in shards:
            path.unlink()
        return len(rows)


def _base_fingerprint(pl_module, base: str) -> Optional[str]:
    """The fingerprint of the base ``pl_module`` runs on: its job-wide record where it keeps one (collective on the
    first call, as this is: every rank describes the run), else ``base``'s own."""
    record = getattr(pl_module, "base_record", None)
    return record()["fingerprint"] if callable(record) else base_fingerprint(base)


def describe_run(datamodule, pl_module) -> dict[str, Any]:
    """What produces this run's rows, as written to ``<output>.meta.json``."""
    hp = pl_module.hparams
    adapter, base = pl_module.adapter, hp.model_name_or_path
    predict_file = datamodule.predict_file
    return {
        "input": {"path": str(predict_file), "sha256": sha256_file(predict_file)},
        # Rank 0's, computed once per job (DiagnosisLoRA.base_record); a module without one hashes here.
        "base": {"model_name_or_path": str(base), "fingerprint": _base_fingerprint(pl_module, str(base))},
        "adapter": None if adapter is None else {"path": str(hp.adapter_path), "fingerprint": adapter.fingerprint},
        "model": {"dtype": hp.dtype, "quantization": hp.quantization},
        "prompt": _as_dict(datamodule.prompt),
        "max_length": datamodule.max_length,
        "generation": _as_dict(pl_module.generation),
        # Noted, not compared: merged or not, the rows come from the same model and settings (see merge_note).
        "inference": {"lora_merged": pl_module.lora_merge_allowed()},
        "packages": package_versions(*PACKAGES),
    }


def merge_note(old: dict[str, Any], new: dict[str, Any], output_path) -> Optional[str]:
    """A note when the rows already written were generated with the LoRA layers merged and this run's are not, or
    the other way round (``model.merge_for_inference``; a meta file from before that option: unmerged).

    Only noted, like a package version: merging computes the same function (``x·(W + s·BA)`` instead of
    ``x·W + s·(x·A)·B``), so it changes no model or setting behind a row, only the order of floating-point rounding, as
    another GPU or torch version does (float32 answers are equal, tests/test_predict.py). Refusing would force a user
    who only wants speed to start a long run over."""
    before = bool((old.get("inference") or {}).get("lora_merged", False))
    now = new["inference"]["lora_merged"]
    if before == now:
        return None

    def state(merged: bool) -> str:
        return "the LoRA layers merged into the base" if merged else "the LoRA layers unmerged"

    return f"{output_path} was started with {state(before)}, this run has {state(now)} (model.merge_for_inference)"


def compare_runs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two :func:`describe_run` records, in words, for the settings that change the rows.

    The base is compared by fingerprint when both have one (the same folder may be named by another path), else by
    the name given; the adapter by fingerprint. The input file, its path and package versions are not compared here.
    """
    out = []
    old_base, new_base = old.get("base") or {}, new["base"]
    if old_base.get("fingerprint") and new_base["fingerprint"]:
        same_base = old_base["fingerprint"] == new_base["fingerprint"]
    else:
        same_base = old_base.get("model_name_or_path") == new_base["model_name_or_path"]
    if not same_base:
        out.append(f"base model {old_base.get('model_name_or_path')} [{old_base.get('fingerprint')}], now "
                   f"{new_base['model_name_or_path']} [{new_base['fingerprint']}]")  # fmt: skip
    old_adapter, new_adapter = old.get("adapter"), new["adapter"]
    if (old_adapter or {}).get("fingerprint") != (new_adapter or {}).get("fingerprint"):
        out.append(f"adapter {_adapter_name(old_adapter)}, now {_adapter_name(new_adapter)}")
    greedy = not (old.get("generation") or {}).get("do_sample") and not new["generation"].get("do_sample")
    for section in ("model", "generation", "prompt"):
        before, now = old.get(section) or {}, new[section]
        for key in sorted(set(before) | set(now)):
            if before.get(key) == now.get(key) or (greedy and section == "generation" and key in SAMPLING_ONLY):
                continue
            if section == "prompt":  # whole paragraphs of text: name the field only
                out.append(f"prompt.{key} differs")
            else:
                out.append(f"{section}.{key} {before.get(key)!r}, now {now.get(key)!r}")
    if old.get("max_length") != new["max_length"]:
        out.append(f"data.max_length {old.get('max_length')!r}, now {new['max_length']!r}")
    return out


def _adapter_name(adapter: Optional[dict]) -> str:
    return "none (zero-shot)" if adapter is None else f"{adapter.get('path')} [{adapter.get('fingerprint')}]"


def _as_dict(obj: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return dict(obj) if isinstance(obj, dict) else dict(vars(obj))


def _resume_command(argv: Optional[list[str]] = None) -> str:
    """The command line of this process without ``--writer.overwrite``, as the user can paste it to resume."""
    return shlex.join(command_without("--writer.overwrite", argv))


def status_summary(path: Path) -> str:
    """`` (ok N, repaired N, truncated N, failed N)`` over the rows of a merged output file, with a warning on its
    own line when the budget closed answers: they parse, but diagnoses may be missing."""
    from healthai.metrics import PARSE_STATUSES

    counts = dict.fromkeys(PARSE_STATUSES, 0)
    for _, row, _ in iter_jsonl(path):
        if isinstance(row, dict) and row.get("parse_status") in counts:
            counts[row["parse_status"]] += 1
    text = " (" + ", ".join(f"{status} {n}" for status, n in counts.items()) + ")"
    if counts["truncated"]:
        text += (f"\nwarning: {counts['truncated']} answer(s) were closed by the token budget (parse_status "
                 "truncated: the budget, not the model, ended them; diagnoses or findings may be missing); raise "
                 "model.generation.max_new_tokens")  # fmt: skip
    return text


def submission_row(row: dict) -> dict:
    """The row in submission key order; ``raw_output`` (failed parses) after; bookkeeping keys (``_order``) dropped."""
    out = {k: row[k] for k in SUBMISSION_KEYS}
    if "raw_output" in row:
        out["raw_output"] = row["raw_output"]
    return out


def _rows_in(path: Path) -> dict[str, str]:
    """``id_key(id) → feature_content`` of a file that its writer has already repaired (see ``DiagnosisWriter.setup``)."""
    rows = {}
    for line_no, row, error in iter_jsonl(path):
        if error is None and "id" not in row:
            error = "row without 'id'"
        if error is not None:
            raise BadRecordError(path, line_no, f"cannot resume from this file: {error}")
        rows[id_key(row["id"])] = row.get("feature_content")
    return rows
