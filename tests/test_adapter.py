"""The adapter the user is pointed to: fit leaves the best checkpoint (by the monitored metric) as adapter/ and the last
step as adapter-last/, with a real model card; predict takes a fit .ckpt directly; an adapter records its base and is
refused on another base unless told otherwise."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, labelled_records, read_jsonl, seed_records, write_jsonl
from healthai.adapter import Adapter, BaseMismatchError
from healthai.cli import cli_main
from healthai.provenance import base_fingerprint, sha256_file

CONFIG = str(REPO / "configs" / "tiny.yaml")
PREDICT_CONFIG = str(REPO / "configs" / "predict_tiny.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """One fit of 3 epochs × 1 step whose ModelCheckpoint monitors val/loss in mode ``max``: the loss falls, so the
    best checkpoint is the first epoch's (step 1) and differs from the last step (3)."""
    root = tmp_path_factory.mktemp("fit")
    train = write_jsonl(root / "train.jsonl", labelled_records(4))
    val = write_jsonl(root / "val.jsonl", labelled_records(2, offset=4))
    callbacks = {"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "ckpt"), "monitor": "val/loss", "mode": "max", "save_top_k": 1,
                       "filename": "best-{step}"}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "ckpt"), "save_last": True, "save_top_k": 0}},
    ]}}  # fmt: skip
    (root / "callbacks.yaml").write_text(yaml.safe_dump(callbacks))
    cli_main(["fit", "--config", CONFIG, "--config", str(root / "callbacks.yaml"),
              "--model.model_name_or_path", str(tiny_model_dir), "--model.learning_rate", "0.01",
              "--data.train_file", str(train), "--data.val_file", str(val), "--data.max_length", "192",
              "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
              "--trainer.enable_progress_bar", "false", "--model.generate_every_n_epochs", "0",
              "--trainer.max_epochs", "3"])  # fmt: skip
    return root


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _ckpt_weights(path: Path) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict  # noqa: F401  (the names PEFT saves: no adapter name)

    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k[len("model.") :].replace(".default.", "."): v for k, v in state.items()}


def test_fit_leaves_the_best_checkpoint_as_adapter_and_the_last_step_as_adapter_last(run, caplog):
    run_dir = run / "tiny" / "version_0"
    best = next((run / "ckpt").glob("best-step=*.ckpt"))
    assert best.name == "best-step=1.ckpt"
    best_weights, last_weights = _weights(run_dir / "adapter"), _weights(run_dir / "adapter-last")
    assert best_weights.keys() == last_weights.keys() and best_weights
    expected_best = _ckpt_weights(best)
    expected_last = _ckpt_weights(run / "ckpt" / "last.ckpt")
    assert all(torch.equal(best_weights[k], expected_best[k]) for k in best_weights)
    assert all(torch.equal(last_weights[k], expected_last[k]) for k in last_weights)
    assert any(not torch.equal(best_weights[k], last_weights[k]) for k in best_weights)


def test_adapter_records_its_base_and_has_a_real_model_card(run, tiny_model_dir):
    run_dir = run / "tiny" / "version_0"
    base = json.loads((run_dir / "adapter" / "base.json").read_text())
    assert base["name_or_path"] == str(tiny_model_dir)
    assert base["path"] == str(tiny_model_dir.resolve())
    assert base["fingerprint"] == base_fingerprint(str(tiny_model_dir))
    card = (run_dir / "adapter" / "README.md").read_text()
    best = torch.load(run / "ckpt" / "best-step=1.ckpt", map_location="cpu", weights_only=False)
    score = best["callbacks"][next(k for k in best["callbacks"] if "val/loss" in k)]["best_model_score"]
    assert f"best val/loss = {float(score):.4g} at step 1" in card
    for text in (f"`{tiny_model_dir}`", base["fingerprint"], "| lora_r | 8 |", "| lora_alpha | 16 |",
                 "| learning_rate | 0.01 |", "| accumulate_grad_batches | 1 |", "| transformers |",
                 f"| train | `{run / 'train.jsonl'}` | 4 | `{sha256_file(run / 'train.jsonl')}` |",
                 f"| validation | `{run / 'val.jsonl'}` | 2 | `{sha256_file(run / 'val.jsonl')}` |",
                 '"user_template": "病历如下：\\n{case}"'):  # fmt: skip
        assert text in card, text
    last_card = (run_dir / "adapter-last" / "README.md").read_text()
    assert "the last step (3)" in last_card


def _predict(model_dir, adapter, records: Path, out: Path, *extra: str):
    args = ["predict", "--config", PREDICT_CONFIG, "--model.model_name_or_path", str(model_dir),
            "--data.predict_file", str(records), "--writer.output_path", str(out), "--writer.progress", "false",
            "--data.max_length", "160", "--model.generation.max_new_tokens", "24", *extra]  # fmt: skip
    if adapter is not None:
        args += ["--model.adapter_path", str(adapter)]
    cli_main(args)
    return read_jsonl(out)


def test_predict_takes_a_fit_checkpoint_as_adapter(run, tiny_model_dir, tmp_path):
    records = write_jsonl(tmp_path / "records.jsonl", seed_records(3))
    from_folder = _predict(tiny_model_dir, run / "tiny" / "version_0" / "adapter", records, tmp_path / "a.jsonl")
    from_ckpt = _predict(tiny_model_dir, run / "ckpt" / "best-step=1.ckpt", records, tmp_path / "b.jsonl")
    base_only = _predict(tiny_model_dir, None, records, tmp_path / "c.jsonl")
    assert from_ckpt == from_folder
    assert from_folder != base_only  # the adapter is applied


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, tiny_model_dir) -> Path:
    """The small model rebuilt with another seed: the same architecture and files, other weights."""
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts" / "make_tiny_model.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    out = tmp_path_factory.mktemp("other") / "tiny-seed1"
    builder.build_model(seed=1).save_pretrained(out)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            os.symlink(f, out / f.name)
    return out


def test_an_adapter_on_another_base_of_the_same_shape_is_refused_unless_allowed(run, other_base, tmp_path):
    adapter = run / "tiny" / "version_0" / "adapter"
    records = write_jsonl(tmp_path / "records.jsonl", seed_records(2))
    out = tmp_path / "pred.jsonl"
    with pytest.raises(BaseMismatchError) as refused:
        _predict(other_base, adapter, records, out)
    message = str(refused.value)
    assert message.count("\n") == 0 and message.startswith(f"adapter {adapter} was trained on base ")
    assert f"{other_base} (fingerprint {base_fingerprint(str(other_base))}) has the same architecture, other weights" in message
    assert message.endswith("pass --model.allow_base_mismatch true to apply it anyway")
    assert not out.exists()
    rows = _predict(other_base, adapter, records, out, "--model.allow_base_mismatch", "true")
    assert [r["id"] for r in rows] == [r["id"] for r in seed_records(2)]


def test_a_launched_rank_checks_the_base_before_it_loads_not_at_construction(run, other_base, tmp_path, monkeypatch):
    # #30 item 8: a rank a launcher started (WORLD_SIZE > 1) does not hash the base when the module is built (every
    # rank at once, ~25 s for 15 GB) but checks the adapter against the job's fingerprint (rank 0's, broadcast; here
    # one process computes it) before the base loads: still refused, nothing written.
    import healthai.adapter
    from healthai.model import DiagnosisLoRA

    adapter = run / "tiny" / "version_0" / "adapter"
    hashed = []
    real = healthai.adapter.base_fingerprint
    monkeypatch.setattr(healthai.adapter, "base_fingerprint", lambda base: hashed.append(base) or real(base))
    monkeypatch.setenv("WORLD_SIZE", "2")
    DiagnosisLoRA(str(other_base), adapter_path=str(adapter))
    assert hashed == []
    out = tmp_path / "pred.jsonl"
    with pytest.raises(BaseMismatchError, match="has the same architecture, other weights"):
        _predict(other_base, adapter, write_jsonl(tmp_path / "records.jsonl", seed_records(2)), out)
    assert not out.exists() and hashed == [str(other_base)]  # once, for the job


def test_predict_on_another_base_exits_2_with_one_line(run, other_base, tmp_path, capsys, monkeypatch):
    from healthai.__main__ import main

    adapter = run / "ckpt" / "best-step=1.ckpt"  # a checkpoint records its base too
    records = write_jsonl(tmp_path / "records.jsonl", seed_records(1))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    # In-process: the same main() `python -m healthai` runs (tests/test_errors.py has the real shell's status 2).
    with pytest.raises(SystemExit) as exited:  # any other exception (a traceback in a shell) fails the test
        main(["predict", "--config", PREDICT_CONFIG, "--model.model_name_or_path", str(other_base),
              "--model.adapter_path", str(adapter), "--data.predict_file", str(records),
              "--writer.output_path", str(tmp_path / "p.jsonl")])  # fmt: skip
    assert exited.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"healthai predict: error: adapter {adapter} was trained on base ") and "Traceback" not in err
    assert "--model.allow_base_mismatch true" in last


def test_export_refuses_another_base_unless_allowed(run, other_base, tmp_path, capsys):
    from healthai.__main__ import main

    adapter = run / "tiny" / "version_0" / "adapter"
    args = ["export", "--adapter", str(adapter), "--base", str(other_base), "--out", str(tmp_path / "merged"),
            "--parity_records", "1", "--parity_max_tokens", "160"]  # fmt: skip
    with pytest.raises(SystemExit) as refused:
        main(args)
    assert refused.value.code == 2
    assert "other weights; pass --allow_base_mismatch true to apply it anyway" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    main([*args, "--allow_base_mismatch", "true"])
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_a_missing_adapter_folder_says_so(tiny_model_dir, tmp_path):
    records = write_jsonl(tmp_path / "records.jsonl", seed_records(1))
    with pytest.raises(FileNotFoundError, match=r"nope: no such adapter folder \(--model.adapter_path\)"):
        _predict(tiny_model_dir, tmp_path / "nope", records, tmp_path / "p.jsonl")
    with pytest.raises(FileNotFoundError, match=r"gone.ckpt: no such checkpoint file"):
        _predict(tiny_model_dir, tmp_path / "gone.ckpt", records, tmp_path / "p.jsonl")


def test_a_relative_base_is_found_from_another_working_directory(run, tmp_path, monkeypatch):
    """The adapter records the base as given (a relative path) and where it was found (absolute)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    real = run / "tiny" / "version_0" / "adapter"
    recorded = {**json.loads((real / "base.json").read_text()), "name_or_path": "models/tiny-qwen2.5"}
    (adapter / "base.json").write_text(json.dumps(recorded))
    monkeypatch.chdir(tmp_path)  # no models/ here
    assert Adapter.open(adapter).resolve_base(None, "--base") == recorded["path"]
    assert Adapter.open(adapter).resolve_base("models/tiny-qwen2.5", "--model.model_name_or_path") == recorded["path"]
    (adapter / "base.json").write_text(json.dumps({**recorded, "path": str(tmp_path / "moved")}))
    with pytest.raises(FileNotFoundError, match=r"base model models/tiny-qwen2.5: no such folder from .*"
                                                r"which is gone too\); pass --base PATH"):  # fmt: skip
        Adapter.open(adapter).resolve_base(None, "--base")


def test_the_cli_writes_adapters_on_fit_only(tiny_model_dir, tmp_path, monkeypatch):
    """The adapter saver is part of every fit the CLI runs, with no config line for it, and of no other command."""
    from lightning.pytorch import Trainer

    from healthai.adapter_saver import AdapterSaver

    monkeypatch.chdir(REPO)
    seen: dict[str, list] = {}

    def record(command: str):
        def run(trainer, *args, **kwargs):  # stands in for the run itself: only the trainer's callbacks matter here
            seen[command] = [type(c) for c in trainer.callbacks]

        return run

    for command in ("fit", "validate", "predict"):
        monkeypatch.setattr(Trainer, command, record(command))
    common = ["--model.model_name_or_path", str(tiny_model_dir), "--trainer.default_root_dir", str(tmp_path)]
    cli_main(["fit", "--config", CONFIG, *common, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    cli_main(["validate", "--config", CONFIG, *common, "--trainer.logger", "false"])
    cli_main(["predict", "--config", PREDICT_CONFIG, *common, "--writer.output_path", str(tmp_path / "p.jsonl")])
    assert seen["fit"].count(AdapterSaver) == 1
    assert AdapterSaver not in seen["validate"] and AdapterSaver not in seen["predict"]
