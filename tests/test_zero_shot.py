"""validate and predict without ``--model.adapter_path`` (zero-shot) run the base model alone. They build no LoRA,
and give the answers that the new, identity LoRA they used to build gave. A checkpoint given by ``--ckpt_path``
still gets its LoRA. validate computes the generated-answer metrics whenever ``model.generate_every_n_epochs`` is not
0, and says why it does not when it is."""

from __future__ import annotations

import pytest
import torch

import healthai.cli  # noqa: F401  (imported at collection, so Lightning's log handlers outlive each test's capture)
from conftest import REPO, labelled_records, read_jsonl, seed_records, write_jsonl
from healthai.base_model import is_lora
from healthai.cli import cli_main


@pytest.fixture(autouse=True)
def _repo_cwd_on_one_thread(monkeypatch):
    """The configs' relative paths hold from the repository. One thread, so both sides of a comparison reduce in the
    same order."""
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rows_with_a_new_lora(tiny_model_dir, records, budget: int, max_length: int) -> list[dict]:
    """predict_step's rows from the base with a new LoRA: what every zero-shot predict ran before (a module outside a
    Trainer is still built that way)."""
    from healthai.data import DiagnosisDataModule
    from healthai.generation import GenerationSettings
    from healthai.model import DiagnosisLoRA

    module = DiagnosisLoRA(str(tiny_model_dir), dtype="float32", gradient_checkpointing=False,
                           generation=GenerationSettings(max_new_tokens=budget))  # fmt: skip
    module.configure_model()
    assert is_lora(module.model)
    module.eval()
    data = DiagnosisDataModule(predict_file=str(records), tokenizer_path=str(tiny_model_dir), eval_batch_size=8,
                               max_length=max_length)  # fmt: skip
    data.setup("predict")
    with torch.no_grad():
        return [row for batch in data.predict_dataloader() for row in module.predict_step(batch, 0)]


def test_zero_shot_predict_builds_no_lora_and_answers_as_the_new_lora_did(tmp_path, tiny_model_dir):
    records = write_jsonl(tmp_path / "records.jsonl", seed_records(4, offset=30))
    out = tmp_path / "pred.jsonl"
    cli = cli_main(["predict", "--config", "configs/predict_tiny.yaml",
                    "--model.model_name_or_path", str(tiny_model_dir), "--data.predict_file", str(records), "--writer.output_path", str(out), "--writer.progress", "false",
                    "--model.generation.max_new_tokens", "24", "--data.max_length", "256"])  # fmt: skip
    assert not is_lora(cli.model.model) and cli.model.base_model is cli.model.model
    assert not cli.model.lora_merged()  # nothing to merge

    def answers(rows):
        return {row["id"]: (row["diseases"], row["reason"], row["parse_status"]) for row in rows}

    expected = answers(rows_with_a_new_lora(tiny_model_dir, records, budget=24, max_length=256))
    assert answers(read_jsonl(out)) == expected and len(expected) == 4


# Expected: validate reads a fit checkpoint (its data layout and checkpoint folder are not this run's).
@pytest.mark.filterwarnings("ignore:WARNING. --ckpt_path .* another training layout", "ignore:The dirpath has changed")
def test_validate_of_a_checkpoint_builds_its_lora_and_generates_unless_told_not_to(tmp_path, tiny_model_dir, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(2))
    val = write_jsonl(tmp_path / "val.jsonl", labelled_records(2, offset=2))
    runs = str(tmp_path / "runs")
    # One epoch of configs/tiny.yaml, which generates every 2 epochs: this fit generates nothing.
    cli_main(["fit", "--config", "configs/tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
              "--data.train_file", str(train), "--data.val_file", str(val), "--trainer.max_epochs", "1",
              "--data.batch_size", "2", "--data.max_length", "256", "--model.generation.max_new_tokens", "48",
              "--model.val_generate_limit", "1", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs,
              "--trainer.callbacks.dirpath", f"{runs}/ckpt"])  # fmt: skip
    ckpt = f"{runs}/ckpt/last.ckpt"
    common = ["validate", "--config", "configs/tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
              "--data.val_file", str(val), "--data.max_length", "256", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "validate"),
              "--trainer.callbacks.dirpath", str(tmp_path / "validate")]  # fmt: skip

    # --ckpt_path: the model's options are the checkpoint's (LightningCLI), no adapter among them. configure_model
    # builds no LoRA, so the checkpoint builds its own before its weights load. validate generates although its one
    # validation is not a second epoch. (allow_layout_change: validate has no training records to resume.)
    by_ckpt = cli_main([*common, "--ckpt_path", ckpt, "--data.allow_layout_change", "true"])
    assert is_lora(by_ckpt.model.model)
    metrics = by_ckpt.trainer.callback_metrics
    assert {"val/loss", "val/disease_f1", "val/json_valid", "val/reason_rougeL"} <= set(metrics)

    # The same weights as an adapter, generation turned off: the same loss, and one line saying why there is no more.
    caplog.clear()
    by_adapter = cli_main([*common, "--model.adapter_path", ckpt, "--model.generate_every_n_epochs", "0"])
    logged = by_adapter.trainer.callback_metrics
    assert "val/disease_f1" not in logged
    assert float(logged["val/loss"]) == pytest.approx(float(metrics["val/loss"]), rel=1e-6)
    assert "validate: model.generate_every_n_epochs 0: no generated answers, so val/loss alone" in caplog.text
