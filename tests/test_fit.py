"""End-to-end fit on the small model through the real CLI: learning, adapter-only checkpoints, exact resume,
the saved adapter, and validation metrics in TensorBoard."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from conftest import labelled_records, write_jsonl
from lightning.pytorch.callbacks import Callback

from healthai.cli import HealthAICLI, cli_main
from healthai.data import DiagnosisDataModule
from healthai.model import DiagnosisLoRA


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def fit(tmp_path: Path, tiny_model_dir: Path, *extra: str, records: int = 4):
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(records))
    args = [
        "fit", "--config", "configs/tiny.yaml",
        "--model.model_name_or_path", str(tiny_model_dir),
        "--data.train_file", str(train), "--data.val_file", str(train),
        "--data.val_overlap", "keep", "--data.max_length", "256",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
        "--trainer.enable_progress_bar", "false",
        "--model.generate_every_n_epochs", "0",
        *extra,
    ]  # fmt: skip
    return cli_main(args)


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])


def test_training_loss_falls_when_overfitting_a_few_records(tmp_path, tiny_model_dir):
    fit(tmp_path, tiny_model_dir, "--trainer.max_steps", "30", "--trainer.max_epochs", "100",
        "--trainer.check_val_every_n_epoch", "100", "--model.learning_rate", "0.01")  # fmt: skip
    logged = scalars(tmp_path / "tiny" / "version_0")
    loss = [v for _, v in logged["train/loss"]]
    assert len(loss) == 30
    assert loss[-1] < 0.4 * loss[0], loss
    assert {"train/lr", "train/tokens_per_sec", "train/padding_fraction"} <= set(logged)


def test_checkpoint_holds_only_adapter_and_resume_continues_at_saved_step(tmp_path, tiny_model_dir, monkeypatch):
    first = fit(tmp_path, tiny_model_dir, "--trainer.max_steps", "3", "--trainer.max_epochs", "10")
    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    saved = {k: v.clone() for k, v in ckpt["state_dict"].items()}

    seen: dict[str, object] = {}

    class StartProbe(Callback):  # records the state the resumed run starts from
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            state = pl_module.state_dict()
            seen["lora"] = {k: state[k].clone() for k in saved}

    monkeypatch.setattr(HealthAICLI, "before_fit", lambda cli: cli.trainer.callbacks.append(StartProbe()), raising=False)
    resumed = fit(tmp_path, tiny_model_dir, "--trainer.max_steps", "5", "--trainer.max_epochs", "10",
                  "--ckpt_path", "last")  # fmt: skip
    assert seen["step"] == 3
    assert all(torch.equal(seen["lora"][k], saved[k]) for k in saved)
    assert resumed.trainer.global_step == 5
    assert first.trainer.global_step == 3


def test_saved_adapter_reloads_with_peft_and_gives_same_logits(tmp_path, tiny_model_dir, capsys):
    cli = fit(tmp_path, tiny_model_dir, "--trainer.max_steps", "4", "--trainer.max_epochs", "10",
              "--model.learning_rate", "0.01")  # fmt: skip
    adapter = tmp_path / "tiny" / "version_0" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "prompt.json", "tokenizer_config.json"} <= {
        p.name for p in adapter.iterdir()
    }
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # dtype given: the small model's config says bfloat16, as the 7B's does.
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                         adapter).eval()  # fmt: skip
    trained = cli.model.model.eval()
    ids = torch.tensor([[151644, 8948, 198, 104383, 109478, 151645, 198]])
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, reloaded(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5)
    assert not torch.allclose(base, got, atol=1e-3)  # the adapter did change the model


def test_validation_generation_logs_diagnosis_metrics_to_tensorboard(tmp_path, tiny_model_dir):
    fit(tmp_path, tiny_model_dir, "--trainer.max_epochs", "2", "--model.generate_every_n_epochs", "1",
        "--model.val_generate_limit", "3", "--model.generation.max_new_tokens", "48")  # fmt: skip
    logged = scalars(tmp_path / "tiny" / "version_0")
    for tag in ("val/loss", "val/disease_f1", "val/disease_precision", "val/disease_recall", "val/json_valid",
                "val/truncated", "val/reason_rougeL"):  # fmt: skip
        assert len(logged[tag]) == 2, tag
    assert all(0.0 <= v <= 1.0 for _, v in logged["val/json_valid"] + logged["val/truncated"])


def training_state(trainer, pl_module) -> dict:
    """What a resume must restore, as it stands: the LoRA weights, AdamW's state (``exp_avg``, ``exp_avg_sq``,
    ``step`` of every parameter), the learning rate and the schedule's position."""
    optimizer = trainer.optimizers[0]
    clone = lambda v: v.detach().clone() if torch.is_tensor(v) else v  # noqa: E731
    return {
        "lora": {k: clone(v) for k, v in pl_module.state_dict().items() if "lora_" in k},
        "adamw": {i: {k: clone(v) for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()},
        "lr": [group["lr"] for group in optimizer.param_groups],
        "schedule_step": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        "global_step": trainer.global_step,
    }


def test_resume_mid_epoch_continues_with_the_uninterrupted_runs_batches(tmp_path, tiny_model_dir, monkeypatch):
    """A run cut at step 3 (after last.ckpt) and resumed with ``--ckpt_path last`` is the uninterrupted run: the same
    batches after the cut, and at the end the same LoRA weights, AdamW state (moments and step counts) and learning
    rate (fp32 on the CPU: equal to rounding)."""
    batches: dict[str, list] = {"full": [], "resumed": []}
    ends: dict[str, dict] = {}
    key = {"name": "full"}

    class BatchProbe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if key["name"] == "crash" and trainer.global_step == 3:
                raise RuntimeError("crash")  # mid-epoch, after last.ckpt was written at step 3
            batches[key["name"]].append((trainer.global_step, batch["input_ids"].sum().item()))

        def on_train_end(self, trainer, pl_module):
            ends[key["name"]] = training_state(trainer, pl_module)

    monkeypatch.setattr(HealthAICLI, "before_fit", lambda cli: cli.trainer.callbacks.append(BatchProbe()), raising=False)
    common = ["--data.batch_size", "2", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
              "--trainer.callbacks.every_n_train_steps", "3", "--trainer.max_steps", "6"]  # fmt: skip
    fit(tmp_path / "full", tiny_model_dir, *common, records=16)
    key["name"] = "crash"
    batches["crash"] = []
    with pytest.raises(RuntimeError, match="crash"):
        fit(tmp_path / "cut", tiny_model_dir, *common, records=16)
    assert torch.load(tmp_path / "cut" / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 3
    key["name"] = "resumed"
    fit(tmp_path / "cut", tiny_model_dir, *common, "--ckpt_path", "last", records=16)
    assert [s for s, _ in batches["resumed"]] == [3, 4, 5]
    assert batches["resumed"] == batches["full"][3:6]

    full, resumed = ends["full"], ends["resumed"]
    assert full["global_step"] == resumed["global_step"] == 6 and full["schedule_step"] == resumed["schedule_step"]
    assert full["lr"] == pytest.approx(resumed["lr"], rel=1e-6, abs=0)
    assert full["lora"].keys() == resumed["lora"].keys() and full["adamw"].keys() == resumed["adamw"].keys()
    assert len(full["adamw"]) == len(full["lora"])  # every LoRA weight has its AdamW state
    for name in full["lora"]:
        torch.testing.assert_close(resumed["lora"][name], full["lora"][name], rtol=1e-5, atol=1e-7, msg=name)
    for i, state in full["adamw"].items():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}, state.keys()
        assert float(resumed["adamw"][i]["step"]) == float(state["step"]) == 6.0, i
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(resumed["adamw"][i][moment], state[moment], rtol=1e-5, atol=1e-10,
                                       msg=f"{moment} of parameter {i}")  # fmt: skip


class GradProbe(DiagnosisLoRA):
    """Keeps the LoRA gradient of each optimizer step as the optimizer will see it."""

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.step_grads = getattr(self, "step_grads", [])
        self.step_grads.append({n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None})


def first_step(tiny_model_dir: Path, train: Path, batch_size: int, accumulate: int):
    import lightning as L

    L.seed_everything(0)  # the same LoRA initialisation in every run
    model = GradProbe(str(tiny_model_dir), dtype="float32", lora_dropout=0.0, gradient_checkpointing=False,
                      generate_every_n_epochs=0)  # fmt: skip
    data = DiagnosisDataModule(train_file=str(train), tokenizer_path=str(tiny_model_dir), val_fraction=0,
                               max_length=160, batch_size=batch_size)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=1, default_root_dir=train.parent,
                        accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(model, data)
    return model.step_grads[0], trainer.callback_metrics["train/loss"]


def test_accumulated_micro_batches_give_the_gradient_of_one_batch_of_the_same_examples(tmp_path, tiny_model_dir):
    # 6 examples with answers of different lengths: 3 micro-batches of 2 in one step (accumulate 4: the epoch ends
    # first, so Lightning steps on a shorter window), against 1 batch of 6.
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(6))
    accumulated, accumulated_loss = first_step(tiny_model_dir, train, batch_size=2, accumulate=4)
    whole, whole_loss = first_step(tiny_model_dir, train, batch_size=6, accumulate=1)
    assert accumulated.keys() == whole.keys() and any("lora_B" in k for k in whole)
    flat = lambda grads: torch.cat([g.flatten() for _, g in sorted(grads.items())])  # noqa: E731
    a, w = flat(accumulated), flat(whole)
    assert w.norm() > 0
    assert (a - w).norm() <= 1e-5 * w.norm()
    assert torch.allclose(accumulated_loss, whole_loss, rtol=1e-5)  # train/loss: the step's per-token mean


def test_resume_from_every_kind_of_checkpoint_sees_exactly_the_uninterrupted_runs_remaining_batches(
    tmp_path, tiny_model_dir, monkeypatch
):
    # 8 records, batch 2: 4 batches an epoch, 2 epochs; validation twice an epoch (val_check_interval 0.5), a checkpoint
    # kept at every validation by the monitored metric, one every 3 steps and one at each epoch's end.
    from lightning.pytorch.callbacks import ModelCheckpoint

    run = {"name": "full"}
    batches: dict[str, list] = {}

    class BatchProbe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.setdefault(run["name"], []).append((trainer.global_step, batch["input_ids"].sum().item()))

    def add_callbacks(cli):
        kept = tmp_path / "kept"
        cli.trainer.callbacks += [
            BatchProbe(),
            ModelCheckpoint(kept, "val-{step}", monitor="val/loss", save_top_k=-1),
            ModelCheckpoint(kept, "every3-{step}", every_n_train_steps=3, save_top_k=-1),
            ModelCheckpoint(kept, "epochend-{step}", every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1),
        ]

    monkeypatch.setattr(HealthAICLI, "before_fit", add_callbacks, raising=False)
    # Validation only has to produce val/loss for the monitored checkpoints (one batch of 2 records), and
    # gradient checkpointing (a forward recomputed in backward) changes no batch order: off, for speed.
    common = ["--data.batch_size", "2", "--trainer.max_epochs", "2", "--trainer.val_check_interval", "0.5",
              "--trainer.limit_val_batches", "1", "--data.eval_batch_size", "2", "--data.max_length", "160",
              "--model.gradient_checkpointing", "false"]  # fmt: skip
    fit(tmp_path / "full", tiny_model_dir, *common, records=8)
    full = batches["full"]
    assert [s for s, _ in full] == list(range(8))
    kept = {p.stem: p for p in (tmp_path / "kept").glob("*.ckpt")}
    kinds = {
        "val-step=2": 2,  # at a validation's end, mid-epoch
        "every3-step=3": 3,  # mid-epoch, by step
        "val-step=4": 4,  # at a validation's end, at the epoch's end
        "epochend-step=4": 4,  # at the epoch's end
    }
    assert set(kinds) <= set(kept), sorted(kept)
    for name, step in kinds.items():
        run["name"] = name
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(tmp_path / name, tiny_model_dir, *common, "--ckpt_path", str(kept[name]), records=8)
        assert batches[name] == full[step:], name
        assert not [w for w in caught if "resuming from a checkpoint that ended before" in str(w.message)]


@pytest.mark.parametrize(("every", "warns"), [(12, True), (16, False), (100, False)])
def test_fit_warns_when_validation_splits_accumulation_windows(every, warns):
    from types import SimpleNamespace

    model = DiagnosisLoRA("unused", generate_every_n_epochs=0)
    model._trainer = SimpleNamespace(val_check_batch=every, accumulate_grad_batches=8, num_training_batches=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.on_train_start()
    assert bool([w for w in caught if "inside windows of accumulate_grad_batches=8" in str(w.message)]) == warns
