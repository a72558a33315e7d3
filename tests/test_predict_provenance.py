"""Predict reruns: rows are resumed only from the same input, model and settings (``<output>.meta.json``), a set of
shards that was never merged is merged, SIGTERM/SIGINT stop at a batch boundary, and no run leaves litter."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, FsyncLog, output_locked_by_another_process, read_jsonl, seed_records, write_jsonl
from healthai.cli import cli_main
from healthai.prompts import PromptStyle


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def short_records(n: int, offset: int = 0, prefix: str = "") -> list[dict]:
    """Real records cut to 60 characters: the prompt is what costs time on the CPU, not what is tested here."""
    return [{"id": r["id"], "feature_content": prefix + r["feature_content"][:60]} for r in seed_records(n, offset)]


def predict_args(model: Path, src: Path, out: Path, *extra: str) -> list[str]:
    return [
        "predict", "--config", "configs/predict_tiny.yaml", "--model.model_name_or_path", str(model),
        "--data.predict_file", str(src), "--writer.output_path", str(out), "--writer.progress", "false",
        "--model.generation.max_new_tokens", "12", "--data.eval_batch_size", "4", *extra,
    ]  # fmt: skip


def files(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` with its bytes: the exact state a run left behind."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter with random non-zero weights, saved as fit saves one (PEFT files, tokenizer, prompt.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    path = tmp_path_factory.mktemp("provenance") / "adapter"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    PromptStyle().save(path)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, FsyncLog]:
    """A folder holding records.jsonl (6 records) and the complete zero-shot run pred.jsonl (+ its meta file), in 2
    batches (4, 2); with what was fsync'ed when, and when each batch started generating and the shards were merged."""
    from healthai.model import DiagnosisLoRA
    from healthai.writer import DiagnosisWriter

    folder = tmp_path_factory.mktemp("finished")
    src = write_jsonl(folder / "records.jsonl", short_records(6))
    shard = folder / "pred.jsonl.rank0.jsonl"
    with pytest.MonkeyPatch.context() as monkeypatch:
        log = FsyncLog(monkeypatch)
        predict_step, merge = DiagnosisLoRA.predict_step, DiagnosisWriter.merge

        def noting_predict_step(self, *args, **kwargs):
            log.note("generate", shard)
            return predict_step(self, *args, **kwargs)

        def noting_merge(self, *args, **kwargs):
            log.note("merge", shard)
            return merge(self, *args, **kwargs)

        monkeypatch.setattr(DiagnosisLoRA, "predict_step", noting_predict_step)
        monkeypatch.setattr(DiagnosisWriter, "merge", noting_merge)
        cli_main(predict_args(tiny_model_dir, src, folder / "pred.jsonl"))
    return folder, log


@pytest.fixture(scope="module")
def finished(finished_run) -> Path:
    """The folder of :func:`finished_run`."""
    return finished_run[0]


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    """A private copy of the finished run."""
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def test_a_finished_run_leaves_rows_and_a_meta_file_naming_what_produced_them(finished, tiny_model_dir):
    assert set(files(finished)) == {"records.jsonl", "pred.jsonl", "pred.jsonl.meta.json"}
    rows = read_jsonl(finished / "pred.jsonl")
    pairs = [(r["id"], r["feature_content"]) for r in short_records(6)]
    assert [(r["id"], r["feature_content"]) for r in rows] == pairs
    meta = json.loads((finished / "pred.jsonl.meta.json").read_text(encoding="utf-8"))
    from healthai.provenance import base_fingerprint, sha256_file

    assert meta["input"]["sha256"] == sha256_file(finished / "records.jsonl")
    fingerprint = base_fingerprint(str(tiny_model_dir))
    assert meta["base"] == {"model_name_or_path": str(tiny_model_dir), "fingerprint": fingerprint} and fingerprint
    assert meta["adapter"] is None
    assert meta["generation"]["max_new_tokens"] == 12 and meta["prompt"]["system"] == PromptStyle().system
    assert {"healthai", "torch", "transformers", "peft", "xgrammar"} <= set(meta["packages"])
    assert meta["inference"] == {"lora_merged": True}  # model.merge_for_inference's default


def test_every_batch_is_fsynced_before_the_next_is_generated_and_the_merge_before_it_replaces_the_output(
    finished_run,
):
    """A killed process loses nothing of the page cache, so kill tests cannot see a missing fsync: observed here. Each
    batch's rows are on disk (an fsync covered the whole shard) before the next batch is generated and before the
    merge; the merged output is fsync'ed (as its temporary file) before it replaces the output."""
    folder, log = finished_run
    marks = [(i, kind, file, size) for i, (kind, file, size) in enumerate(log.events) if kind != "fsync"]
    assert [kind for _, kind, _, _ in marks] == ["generate", "generate", "merge"], log.events
    (_, _, none, empty), *later = marks
    assert none is None and empty == 0  # the first batch: no shard yet
    shard = later[0][2]
    assert shard is not None and all(file == shard for _, _, file, _ in later)
    for i, kind, _, size in later:  # the second batch's start, then the merge: the shard as it stands is on disk
        assert size > 0 and log.synced(shard, before=i) == size, (kind, size, log.events)
    output = folder / "pred.jsonl"
    assert log.synced(FsyncLog.file_id(output)) == output.stat().st_size > 0


def test_same_ids_with_other_case_text_are_refused_and_overwrite_starts_over(run_dir, tiny_model_dir, capsys):
    """Case 1: another input with the same ids must not be answered with the old rows."""
    before = files(run_dir)
    other = write_jsonl(run_dir / "other.jsonl", short_records(6, prefix="（复诊）"))
    with pytest.raises(ValueError) as err:
        cli_main(predict_args(tiny_model_dir, other, run_dir / "pred.jsonl"))
    message = str(err.value)
    assert "pred.jsonl: 6 of 6 row(s) already written have another feature_content than" in message
    assert "--writer.overwrite true" in message and "\n" not in message
    assert files(run_dir) == {**before, "other.jsonl": (run_dir / "other.jsonl").read_bytes()}  # nothing touched

    cli_main(predict_args(tiny_model_dir, other, run_dir / "pred.jsonl", "--writer.overwrite", "true"))
    rows = read_jsonl(run_dir / "pred.jsonl")
    assert [r["feature_content"] for r in rows] == [r["feature_content"] for r in read_jsonl(other)]
    assert set(files(run_dir)) == {"records.jsonl", "other.jsonl", "pred.jsonl", "pred.jsonl.meta.json"}
    meta = json.loads((run_dir / "pred.jsonl.meta.json").read_text(encoding="utf-8"))
    assert meta["input"]["path"] == str(other)


@pytest.mark.parametrize("change, expected", [
    (["--model.generation.max_new_tokens", "10"], "generation.max_new_tokens 12, now 10"),
    (["--data.max_length", "500"], "data.max_length 768, now 500"),
    ("adapter", "adapter none (zero-shot), now "),
])  # fmt: skip
def test_other_adapter_or_settings_on_the_same_output_are_refused(run_dir, tiny_model_dir, adapter_dir, change,
                                                                   expected):  # fmt: skip
    before = files(run_dir)
    extra = ["--model.adapter_path", str(adapter_dir)] if change == "adapter" else change
    with pytest.raises(ValueError, match="were written with other settings") as err:
        cli_main(predict_args(tiny_model_dir, run_dir / "records.jsonl", run_dir / "pred.jsonl", *extra))
    assert expected in str(err.value) and "--writer.overwrite true" in str(err.value)
    assert files(run_dir) == before


@pytest.mark.parametrize("change, expected", [
    ("base", "base model {tiny} [{old}], now {other} [{new}]"),
    (["--data.prompt.system", "另一个系统提示"], "prompt.system differs"),
    (["--model.dtype", "bfloat16"], "model.dtype 'float32', now 'bfloat16'"),
    (["--model.quantization", "nf4"], "model.quantization None, now 'nf4'"),
], ids=["base", "prompt", "dtype", "quantization"])  # fmt: skip
def test_a_rerun_onto_another_base_prompt_dtype_or_quantisation_is_refused_in_one_line(
    run_dir, tiny_model_dir, change, expected, capfd, monkeypatch
):
    """Each setting that changes the rows refuses a rerun onto the rows already written: the base (a copy of the small
    model with one bit of one weight flipped: same name and shapes, another model), the prompt, the dtype, the
    quantisation. One line, exit status 2, before the model loads, nothing touched."""
    from healthai.model import DiagnosisLoRA
    from healthai.provenance import base_fingerprint
    from test_fit_resume import other_base

    monkeypatch.setattr(DiagnosisLoRA, "configure_model", lambda self: pytest.fail("the model was loaded"))
    model, extra = tiny_model_dir, change
    if change == "base":
        model, extra = other_base(tiny_model_dir, run_dir.parent / "other-base"), []
        expected = expected.format(tiny=tiny_model_dir, old=base_fingerprint(str(tiny_model_dir)), other=model,
                                   new=base_fingerprint(str(model)))  # fmt: skip
    before = files(run_dir)
    code, err = run_main(predict_args(model, run_dir / "records.jsonl", run_dir / "pred.jsonl", *extra), capfd)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("healthai predict: error: ") and "were written with other settings (" in lines[-1]
    assert expected in lines[-1] and "--writer.overwrite true" in lines[-1], lines[-1]
    assert files(run_dir) == before


def test_merging_the_lora_layers_or_not_is_noted_on_resume_not_refused(run_dir, tiny_model_dir, capsys):
    """Merged or not, the rows come from the same model and settings (only the rounding order differs, as on another
    GPU): a rerun with the other choice resumes, says so and records its own."""
    rows = read_jsonl(run_dir / "pred.jsonl")
    write_jsonl(run_dir / "pred.jsonl", rows[:4])
    capsys.readouterr()
    cli_main(predict_args(tiny_model_dir, run_dir / "records.jsonl", run_dir / "pred.jsonl",
                          "--model.merge_for_inference", "false"))  # fmt: skip
    out = capsys.readouterr().out
    assert ("pred.jsonl was started with the LoRA layers merged into the base, this run has the LoRA layers unmerged"
            " (model.merge_for_inference)") in out  # fmt: skip
    assert "4 record(s) already done, 2 to go" in out
    assert read_jsonl(run_dir / "pred.jsonl")[:4] == rows[:4] and len(read_jsonl(run_dir / "pred.jsonl")) == 6
    meta = json.loads((run_dir / "pred.jsonl.meta.json").read_text(encoding="utf-8"))
    assert meta["inference"] == {"lora_merged": False}


def test_rows_without_a_meta_file_are_not_resumed(run_dir, tiny_model_dir):
    (run_dir / "pred.jsonl.meta.json").unlink()
    before = files(run_dir)
    with pytest.raises(ValueError, match=r"holds 6 row\(s\) but no pred.jsonl.meta.json"):
        cli_main(predict_args(tiny_model_dir, run_dir / "records.jsonl", run_dir / "pred.jsonl"))
    assert files(run_dir) == before


def test_output_equal_to_the_input_is_refused_and_leaves_no_litter(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "records.jsonl", short_records(3))
    before = files(tmp_path)
    with pytest.raises(ValueError, match="would overwrite --data.predict_file"):
        cli_main(predict_args(tiny_model_dir, src, src))
    assert files(tmp_path) == before  # no shard, no meta file


def test_an_input_with_records_appended_resumes_and_predicts_only_the_new_ones(run_dir, tiny_model_dir, capsys):
    """The input file changed, but every row already written still matches it: resuming is what the user wants."""
    old_rows = read_jsonl(run_dir / "pred.jsonl")
    grown = write_jsonl(run_dir / "records.jsonl", short_records(8))  # the same 6, then 2 more
    cli_main(predict_args(tiny_model_dir, grown, run_dir / "pred.jsonl"))
    out = capsys.readouterr().out
    assert "6 record(s) already done, 2 to go" in out and "records.jsonl changed since" in out
    rows = read_jsonl(run_dir / "pred.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in short_records(8)]
    assert rows[:6] == old_rows  # kept as they were, not redone
    assert set(files(run_dir)) == {"records.jsonl", "pred.jsonl", "pred.jsonl.meta.json"}


def test_complete_shards_that_were_never_merged_are_merged_on_rerun(run_dir, tiny_model_dir, capsys):
    """Case 2: a crash after the last batch, before the merge, leaves complete shards and no output."""
    rows = read_jsonl(run_dir / "pred.jsonl")
    (run_dir / "pred.jsonl").unlink()
    write_jsonl(run_dir / "pred.jsonl.rank0.jsonl", rows[::2][::-1])  # as two DDP ranks would, out of input order
    write_jsonl(run_dir / "pred.jsonl.rank1.jsonl", rows[1::2])
    cli_main(predict_args(tiny_model_dir, run_dir / "records.jsonl", run_dir / "pred.jsonl"))
    assert "6 record(s) already done, 0 to go" in capsys.readouterr().out
    assert read_jsonl(run_dir / "pred.jsonl") == rows
    assert set(files(run_dir)) == {"records.jsonl", "pred.jsonl", "pred.jsonl.meta.json"}


def test_an_empty_input_writes_an_empty_output_and_no_shard(tmp_path, tiny_model_dir):
    src = tmp_path / "records.jsonl"
    src.write_bytes(b"")
    for _ in range(2):  # the rerun finds the same state
        cli_main(predict_args(tiny_model_dir, src, tmp_path / "pred.jsonl"))
        assert set(files(tmp_path)) == {"records.jsonl", "pred.jsonl", "pred.jsonl.meta.json"}
        assert (tmp_path / "pred.jsonl").read_bytes() == b""


def test_a_run_failing_after_setup_leaves_no_empty_shard(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "records.jsonl", short_records(2))
    before = files(tmp_path)
    with pytest.raises(Exception):  # the model cannot be built: after the writer's setup, before any row
        cli_main(predict_args(tiny_model_dir, src, tmp_path / "pred.jsonl", "--model.attn_implementation", "bogus"))
    assert files(tmp_path) == before


# -- stop signals (a real process: the signal is what is tested) ------------------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_ends_at_a_batch_boundary_and_the_rerun_completes_exactly_once(
    tmp_path, tiny_model_dir, signum, code, capsys, forkserver
):
    """Case 7: a scheduler's SIGTERM (or Ctrl+C) ends the run after the current batch, keeps every row written,
    says how to resume and exits 128 + signal; rerunning the same command completes every id once."""
    records = short_records(16, offset=20)  # 8 batches: the signal comes after the first, far from the last
    src = write_jsonl(tmp_path / "records.jsonl", records)
    out = tmp_path / "pred.jsonl"
    shard = tmp_path / "pred.jsonl.rank0.jsonl"
    args = predict_args(tiny_model_dir, src, out, "--data.eval_batch_size", "2")
    proc = forkserver.start(["-m", "healthai", *args], stderr=tmp_path / "stderr.txt")  # a real process, forked
    try:
        deadline = time.time() + 180
        while proc.poll() is None and not (shard.exists() and shard.read_bytes().count(b"\n") >= 2):
            assert time.time() < deadline, "no batch written in time"
            time.sleep(0.02)
        proc.send_signal(signum)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = (tmp_path / "stderr.txt").read_text(encoding="utf-8", errors="replace")
    assert rc == code, stderr[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "rerun the same command to resume" in stderr
    kept = read_jsonl(shard)
    assert len(kept) % 2 == 0 and 2 <= len(kept) < len(records)  # whole batches only, and it did stop early
    assert len({r["id"] for r in kept}) == len(kept)
    assert set(files(tmp_path)) == {"records.jsonl", "stderr.txt", "pred.jsonl.rank0.jsonl", "pred.jsonl.meta.json"}
    if signum == signal.SIGINT:
        return  # the rerun is the same as after SIGTERM; once is enough for a test this slow

    cli_main(args)  # the same command, in this process (a second process would only cost time)
    assert f"{len(kept)} record(s) already done" in capsys.readouterr().out
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [r["id"] for r in records]  # every id once, in input order
    by_id = {r["id"]: r for r in rows}
    assert all(by_id[r["id"]] == r for r in kept)  # the rows written before the signal are the ones kept
    assert set(files(tmp_path)) == {"records.jsonl", "stderr.txt", "pred.jsonl", "pred.jsonl.meta.json"}


def test_the_resume_hint_never_starts_over():
    """A run started with --writer.overwrite true and then stopped must be resumed without it (it would delete the
    rows just written)."""
    from healthai.writer import _resume_command

    argv = ["/x/healthai/__main__.py", "predict", "--writer.overwrite", "true", "--data.predict_file", "a b.jsonl",
            "--writer.overwrite=true"]  # fmt: skip
    assert _resume_command(argv) == "python -m healthai predict --data.predict_file 'a b.jsonl'"


# -- any number of processes resumes any earlier run's shards; ids by the one id rule ----------------------------------


def test_shards_of_an_earlier_run_with_more_processes_and_a_torn_line_resume_in_one_process(run_dir, tiny_model_dir,
                                                                                            capsys):  # fmt: skip
    """A 4-process run killed mid-write (SIGKILL: rank 3's last line torn) is resumed by one process: every shard is
    repaired and read, the torn record is redone, and every id is in the output exactly once."""
    rows = read_jsonl(run_dir / "pred.jsonl")
    (run_dir / "pred.jsonl").unlink()
    write_jsonl(run_dir / "pred.jsonl.rank0.jsonl", [rows[0], rows[4]])
    write_jsonl(run_dir / "pred.jsonl.rank1.jsonl", [rows[1]])
    rank3 = write_jsonl(run_dir / "pred.jsonl.rank3.jsonl", [rows[3]])
    with open(rank3, "a", encoding="utf-8") as f:
        f.write(json.dumps(rows[5], ensure_ascii=False)[:30])  # the kill cut this line
    cli_main(predict_args(tiny_model_dir, run_dir / "records.jsonl", run_dir / "pred.jsonl"))
    assert "4 record(s) already done, 2 to go" in capsys.readouterr().out
    assert read_jsonl(run_dir / "pred.jsonl") == rows  # greedy: the redone rows are the ones the first run wrote
    assert set(files(run_dir)) == {"records.jsonl", "pred.jsonl", "pred.jsonl.meta.json"}


def test_rows_resume_by_the_id_rule_5_and_string_5_are_one_record(run_dir, tiny_model_dir, capsys):
    """The rows were written with integer ids; the input now writes them as strings: the same records, resumed."""
    rows = read_jsonl(run_dir / "pred.jsonl")
    write_jsonl(run_dir / "records.jsonl", [dict(r, id=str(r["id"])) for r in short_records(6)])
    cli_main(predict_args(tiny_model_dir, run_dir / "records.jsonl", run_dir / "pred.jsonl"))
    assert "6 record(s) already done, 0 to go" in capsys.readouterr().out
    # The output names each record as the input does now.
    assert read_jsonl(run_dir / "pred.jsonl") == [dict(r, id=str(r["id"])) for r in rows]


# -- every refusal is one line and exit status 2, found before the model loads ----------------------------------------


def run_main(argv: list[str], capfd) -> tuple[int, str]:
    from healthai.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capfd.readouterr().err


@pytest.mark.parametrize("case, expected", [
    ("other settings", "were written with other settings (generation.max_new_tokens 12, now 10)"),
    ("other content", "already written have another feature_content"),
    ("other adapter", "were written with other settings (adapter none (zero-shot), now "),
    ("meta deleted", "but no pred.jsonl.meta.json"),
    ("meta corrupt", "pred.jsonl.meta.json: unreadable"),
    ("meta a list", "pred.jsonl.meta.json: not the record of a predict run"),
    ("meta of another shape", "pred.jsonl.meta.json: not the record of a predict run"),
    ("output is the input", "would overwrite --data.predict_file"),
    ("output is a directory", "is a directory; name a file"),
    ("output under a file", "cannot write in"),
    ("read-only folder", "cannot write in"),
])  # fmt: skip
def test_every_predict_refusal_is_one_line_exit_2_before_the_model_loads(run_dir, tiny_model_dir, adapter_dir, case,
                                                                         expected, capfd, monkeypatch):  # fmt: skip
    from healthai.model import DiagnosisLoRA

    def no_load(self):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(DiagnosisLoRA, "configure_model", no_load)
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    src, out, extra = run_dir / "records.jsonl", run_dir / "pred.jsonl", []
    meta = run_dir / "pred.jsonl.meta.json"
    if case == "other settings":
        extra = ["--model.generation.max_new_tokens", "10"]
    elif case == "other content":
        src = write_jsonl(run_dir / "other.jsonl", short_records(6, prefix="（复诊）"))
    elif case == "other adapter":
        extra = ["--model.adapter_path", str(adapter_dir)]
    elif case == "meta deleted":
        meta.unlink()
    elif case == "meta corrupt":
        meta.write_text('{"input": ', encoding="utf-8")
    elif case == "meta a list":
        meta.write_text("[]\n", encoding="utf-8")
    elif case == "meta of another shape":
        meta.write_text('{"base": "Qwen", "generation": [1]}\n', encoding="utf-8")
    elif case == "output is the input":
        out = src
    elif case == "output is a directory":
        out = run_dir
    elif case == "output under a file":
        out = src / "pred.jsonl"
    elif case == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder: the refusal cannot be seen as root")
        folder = run_dir / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        out = folder / "pred.jsonl"
    code, err = run_main(predict_args(tiny_model_dir, src, out, *extra), capfd)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("healthai predict: error: ") and expected in lines[-1], lines[-1]


def test_an_output_another_process_is_writing_is_refused_naming_its_pid_before_the_model_loads(
        run_dir, tiny_model_dir, capfd, monkeypatch):  # fmt: skip
    """Two predict runs on one output both did all the work (#29 item 3): the second is refused, and leaves the
    first's output, shards and meta file alone."""
    from healthai.model import DiagnosisLoRA

    def no_load(self):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(DiagnosisLoRA, "configure_model", no_load)
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    out = run_dir / "pred.jsonl"
    with output_locked_by_another_process(out, "--writer.output_path") as pid:
        before = files(run_dir)
        # --writer.overwrite true: the refusal comes before anything is removed
        argv = predict_args(tiny_model_dir, run_dir / "records.jsonl", out, "--writer.overwrite", "true")
        code, err = run_main(argv, capfd)
        assert files(run_dir) == before
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines[-1] == (f"healthai predict: error: --writer.output_path {out} is being written by "
                                       f"process {pid} (lock {out}.lock); wait for it to finish or stop it, then "
                                       "rerun to resume, or choose another output")  # fmt: skip
