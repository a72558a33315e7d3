"""Issue 34 item 4: a fit's run folder. A finished fit prints its adapter and a predict command that works as printed;
a resumed fit continues in the folder of the run it resumes; a refused fit leaves no folder behind."""

from __future__ import annotations

import contextlib
import io
import shlex
from pathlib import Path

import pytest

from conftest import REPO, labelled_records, read_jsonl, write_jsonl
from healthai.__main__ import main
from test_fit_resume import fit_args
from test_fit import scalars


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, str]:
    """One finished fit of 2 steps on 4 records, shared by the tests that read a finished run (the first prints its
    adapter, the last refuses to resume it): its folder, its training records and what it printed."""
    folder = tmp_path_factory.mktemp("finished")
    train = write_jsonl(folder / "train.jsonl", labelled_records(4))
    out = io.StringIO()
    code = 0
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out):
        try:
            main(fit_args(folder, tiny_model_dir, train, "--trainer.max_steps", "2"))
        except SystemExit as e:
            code = e.code
    assert code == 0, out.getvalue()[-2000:]
    return folder, train, out.getvalue()


def run_main(argv: list[str], capfd) -> tuple[int, str, str]:
    """``python -m healthai`` in-process: exit status (0 when it returns), stdout, stderr."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capfd.readouterr()
    return code, out.out, out.err


def test_fit_prints_its_adapter_and_a_predict_command_that_runs_as_printed(finished, tmp_path, capfd):
    folder, _, out = finished
    run = folder / "tiny" / "version_0"
    lines = out.splitlines()
    assert f"adapter: {run / 'adapter'}" in lines, out[-2000:]
    command = lines[lines.index("predict with it:") + 1].strip()
    assert command == f"python -m healthai predict --config {run / 'predict.yaml'} --data.predict_file RECORDS.jsonl"

    records = write_jsonl(tmp_path / "records.jsonl", labelled_records(3, offset=20))
    argv = shlex.split(command.replace("RECORDS.jsonl", str(records)))[3:]  # after `python -m healthai`
    code, _, err = run_main(argv, capfd)
    assert code == 0, err[-2000:]
    rows = read_jsonl(run / "predictions.jsonl")  # the output path the config names: in the run folder
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in read_jsonl(records))
    assert "prompt" not in err  # the fit's prompt is the adapter's: no "gives way" warning


def test_a_resumed_fit_continues_in_the_folder_of_the_run_it_resumes(tmp_path, tiny_model_dir, capfd):
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(8))
    every_step = ["--trainer.callbacks.every_n_train_steps", "1"]
    assert run_main(fit_args(tmp_path, tiny_model_dir, train, "--trainer.max_steps", "2", *every_step), capfd)[0] == 0
    for target in ("5", "7"):  # resumed twice: `last`, then the explicit file
        ckpt = "last" if target == "5" else str(tmp_path / "ckpt" / "last.ckpt")
        code, out, err = run_main(fit_args(tmp_path, tiny_model_dir, train, "--trainer.max_steps", target,
                                           "--ckpt_path", ckpt, *every_step), capfd)  # fmt: skip
        assert code == 0, err[-2000:]
    runs = sorted(p.name for p in (tmp_path / "tiny").iterdir())
    assert runs == ["version_0"], runs
    steps = [step for step, _ in scalars(tmp_path / "tiny" / "version_0")["train/loss"]]
    assert steps == list(range(7)) or sorted(set(steps)) == list(range(7)), steps  # one curve, every step once
    assert f"adapter: {tmp_path / 'tiny' / 'version_0' / 'adapter'}" in out


def test_a_refused_fit_leaves_no_run_folder_and_a_refused_resume_keeps_its_run(finished, tmp_path, tiny_model_dir,
                                                                               capfd):  # fmt: skip
    long = [{**r, "reason": "很长的理由。" * 80} for r in labelled_records(4)]  # over tiny.yaml's budget (192)
    train = write_jsonl(tmp_path / "train.jsonl", long)
    code, _, err = run_main(fit_args(tmp_path, tiny_model_dir, train, "--data.max_length", "768"), capfd)
    assert code == 2 and "model.generation.max_new_tokens" in err.splitlines()[-1], err[-2000:]
    assert not (tmp_path / "tiny").exists() or not any((tmp_path / "tiny").iterdir())

    folder, good, _ = finished  # a finished run of 2 steps
    code, _, err = run_main(fit_args(folder, tiny_model_dir, good, "--trainer.max_steps", "4", "--ckpt_path", "last",
                                     "--model.lora_r", "4"), capfd)  # fmt: skip
    assert code == 2 and "--ckpt_path" in err.splitlines()[-1], err[-2000:]
    run = folder / "tiny" / "version_0"
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "config.yaml").is_file()
    assert sorted(p.name for p in (folder / "tiny").iterdir()) == ["version_0"]
