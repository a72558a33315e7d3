"""Lightning's own DDP strategy on CPU (2 processes, gloo): fit, and predict split across ranks then merged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, labelled_records, read_jsonl, seed_records, write_jsonl
from test_tensorboard import rendered_rows, text_summaries

pytestmark = pytest.mark.slow
DDP = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]


def run(forkserver, args: list[str]) -> subprocess.CompletedProcess:
    """``python -m healthai *args`` as 2 DDP processes (forked, as tests/forkserver.py says; the FSDP test runs
    Lightning's own launcher from a fresh interpreter); rank 0's result."""
    return forkserver.run_ranks(["-m", "healthai", *args], nprocs=2)[0]


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every ``tag`` scalar the run's TensorBoard logger wrote."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_ddp_fit_saves_adapter_only_checkpoints_that_one_process_refuses_to_resume(tmp_path, tiny_model_dir,
                                                                                   monkeypatch, forkserver):
    # The same 2-process run also checks the TensorBoard sample table under DDP (one launch for both: building the
    # model in each rank is most of a DDP test's cost). 3 validation records: rank 0 generates records 0 and 2, rank 1
    # record 1 and the sampler's repeat of record 0 (in one batch of 2); the gathered table holds records 0, 1, 2 in
    # file order, once each, as on one device.
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(8))
    val_records = labelled_records(3, offset=10)
    val = write_jsonl(tmp_path / "val.jsonl", val_records)
    run(forkserver, [
        "fit", "--config", "configs/tiny.yaml", *DDP,
        "--model.model_name_or_path", str(tiny_model_dir),
        "--data.train_file", str(train), "--data.val_file", str(val), "--data.max_length", "256",
        "--data.batch_size", "2", "--trainer.max_steps", "4", "--trainer.max_epochs", "10",
        "--trainer.num_sanity_val_steps", "0", "--model.generate_every_n_epochs", "1", "--model.val_log_samples", "8",
        "--model.generation.max_new_tokens", "34", "--model.generation.constrained", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
    ])  # fmt: skip
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 and all("lora_" in k for k in ckpt["state_dict"])
    assert (tmp_path / "tiny" / "version_0" / "adapter" / "adapter_model.safetensors").is_file()
    tables = text_summaries(tmp_path / "tiny" / "version_0")
    assert len(tables) == 2  # 2 steps per epoch (2 ranks x batch 2 of 8 records): validated after steps 2 and 4
    for _, markdown in tables:
        assert "the first 3 validation records" in markdown
        assert [row[0] for row in rendered_rows(markdown)] == [str(r["id"]) for r in val_records]

    # val/loss under DDP is one process's loss on the same weights: the repeat of record 0 in rank 1's batch does not
    # count. The last validation ran on the step-4 weights, which last.ckpt holds; one process validates them here.
    from healthai.cli import cli_main

    monkeypatch.chdir(REPO)
    logged = scalars(tmp_path / "tiny" / "version_0", "val/loss")
    assert len(logged) == 2  # the two validations; the last one after the final optimizer step
    ddp_loss = logged[-1]
    single = cli_main([
        "validate", "--config", "configs/tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
        "--model.adapter_path", str(tmp_path / "ckpt" / "last.ckpt"), "--data.val_file", str(val),
        "--data.max_length", "256", "--data.eval_batch_size", "2", "--model.generate_every_n_epochs", "0",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "single"),
    ]).trainer.callback_metrics["val/loss"]  # fmt: skip
    assert ddp_loss[1] == pytest.approx(float(single), rel=1e-5)

    # Resumed on one process, the saved position (2 ranks x 2 batches of 2) would mean other records: refused.
    from healthai.resume import ResumeRefused

    with pytest.raises(ResumeRefused, match="processes .* 2, now 1"):
        cli_main([
            "fit", "--config", "configs/tiny.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--model.model_name_or_path", str(tiny_model_dir), "--ckpt_path", "last",
            "--data.train_file", str(train), "--data.val_file", str(train),
            "--data.val_overlap", "keep", "--data.max_length", "256",
            "--data.batch_size", "2", "--trainer.max_steps", "6", "--trainer.max_epochs", "10",
            "--model.generate_every_n_epochs", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
        ])  # fmt: skip


def test_ddp_predict_merges_shards_into_the_single_process_result(tmp_path, tiny_model_dir, monkeypatch, forkserver):
    # 6 short records, 16 new tokens: the shards, their merge and equality with one process are what is tested. The
    # single-process reference runs in-process (on one thread, as the DDP ranks do); only DDP needs the real CLI, and
    # it runs once (building the model in each rank is most of its cost): as the resume of an earlier run's shards.
    from healthai.cli import cli_main

    records = seed_records(6, offset=80)
    src = write_jsonl(tmp_path / "records.jsonl", records)
    common = ["predict", "--config", "configs/predict_tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
              "--data.predict_file", str(src), "--data.eval_batch_size", "2", "--writer.progress", "false",
              "--model.generation.max_new_tokens", "16"]  # fmt: skip
    monkeypatch.chdir(REPO)  # the config's relative paths
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cli_main([*common, "--writer.output_path", str(tmp_path / "single.jsonl")])
    finally:
        torch.set_num_threads(threads)
    single = read_jsonl(tmp_path / "single.jsonl")
    assert [r["id"] for r in single] == [r["id"] for r in records]

    # A 3-process run killed mid-write (rank 2's last line torn; rows 1, 2, 4 and 5 never written), resumed by 2
    # processes: rank zero repairs every shard, both read them all, each rank generates a batch of 2 of the 4 rows
    # left, and the merge holds every id once, in input order, equal to one process's rows.
    shutil.copy(tmp_path / "single.jsonl.meta.json", tmp_path / "resumed.jsonl.meta.json")
    write_jsonl(tmp_path / "resumed.jsonl.rank0.jsonl", [single[0]])
    write_jsonl(tmp_path / "resumed.jsonl.rank1.jsonl", [single[3]])
    rank2 = write_jsonl(tmp_path / "resumed.jsonl.rank2.jsonl", [])
    with open(rank2, "a", encoding="utf-8") as f:
        f.write(json.dumps(single[5], ensure_ascii=False)[:25])
    out = run(forkserver, [*common, *DDP, "--writer.output_path", str(tmp_path / "resumed.jsonl")]).stdout
    assert "2 record(s) already done, 4 to go" in out
    assert read_jsonl(tmp_path / "resumed.jsonl") == single
    assert not list(tmp_path.glob("resumed.jsonl.rank*"))
    assert not (tmp_path / "resumed.jsonl.lock").exists()  # rank zero held the output's lock, and removed it


def test_ddp_step_gradient_is_the_single_process_gradient_of_the_same_examples(tmp_path, tiny_model_dir,
                                                                               monkeypatch, forkserver):  # fmt: skip
    # 8 examples, one step of 2 accumulated global batches of 4: 1 process × batch 4, or 2 ranks × batch 2 (the
    # sampler builds the same global batches). Ranks hold different numbers of answer tokens; the step must still
    # weigh every token the same.
    import importlib.util

    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(8))
    steps = {}
    for devices, batch_size in ((1, 4), (2, 2)):
        out = tmp_path / f"devices{devices}"
        out.mkdir()
        argv = ["tests/ddp_grad_step.py", str(tiny_model_dir), str(train), str(devices), str(batch_size), "2", str(out)]
        if devices == 1:  # the same script in this process: one process needs no launcher (saves an interpreter start)
            spec = importlib.util.spec_from_file_location("ddp_grad_step", REPO / "tests" / "ddp_grad_step.py")
            script = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(script)
            monkeypatch.setattr(sys, "argv", argv)
            script.main()
        else:
            forkserver.run_ranks(argv, nprocs=devices)
        steps[devices] = [torch.load(out / f"rank{r}.pt") for r in range(devices)]
    ranks = steps[2]
    assert ranks[0]["tokens"] != ranks[1]["tokens"]
    assert ranks[0]["tokens"] + ranks[1]["tokens"] == steps[1][0]["tokens"]
    flat = lambda grads: torch.cat([g.flatten() for _, g in sorted(grads.items())])  # noqa: E731
    single = flat(steps[1][0]["grads"])
    for rank in ranks:  # DDP leaves every rank with the same, all-reduced gradient
        assert (flat(rank["grads"]) - single).norm() <= 1e-5 * single.norm()
