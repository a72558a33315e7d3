"""LoRA variants (DoRA, rsLoRA), initialisations (Gaussian, PiSSA, OLoRA) and NEFTune on the small model: each fits and
its loss falls; the saved adapter (a PiSSA/OLoRA one converted) applies to the unmodified base as predict loads it;
export's merge parity holds; a resume with another variant and the combinations that cannot run are refused in one
line; NEFTune changes training forwards only."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, labelled_records, read_jsonl, seed_records, write_jsonl
from healthai.cli import cli_main
from healthai.errors import ConfigError
from test_export import PARITY_ATOL
from test_fit import scalars
from test_fit_resume import run_main

STEPS = 5
VARIANTS = {
    "dora": ["--model.lora_variant", "dora"],
    "rslora": ["--model.lora_variant", "rslora"],
    "gaussian": ["--model.lora_init", "gaussian"],
    "pissa": ["--model.lora_init", "pissa"],
    "olora": ["--model.lora_init", "olora", "--model.lora_variant", "rslora"],  # a moved base with rsLoRA's scaling
}
IDS = torch.tensor([[151644, 8948, 198, 104383, 109478, 151645, 198]])


def fit_args(folder: Path, model: Path, train: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", "configs/tiny.yaml", "--model.model_name_or_path", str(model),
        "--data.train_file", str(train), "--data.val_file", str(train),
        "--data.val_overlap", "keep", "--data.max_length", "192",
        "--trainer.max_steps", str(STEPS), "--trainer.max_epochs", "100", "--trainer.check_val_every_n_epoch", "100",
        "--trainer.default_root_dir", str(folder), "--trainer.logger.init_args.save_dir", str(folder),
        "--trainer.callbacks.dirpath", str(folder / "ckpt"), "--trainer.enable_progress_bar", "false",
        "--model.generate_every_n_epochs", "0", *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def in_repo():
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(cwd)


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def fits(tmp_path_factory, tiny_model_dir) -> dict[str, tuple[object, Path]]:
    """Each variant fitted ``STEPS`` steps on 4 records: (the CLI, with the trained module; the run folder)."""
    root = tmp_path_factory.mktemp("variants")
    train = write_jsonl(root / "train.jsonl", labelled_records(4))
    out = {}
    with in_repo():
        for name, extra in VARIANTS.items():
            out[name] = cli_main(fit_args(root / name, tiny_model_dir, train, *extra)), root / name
    return out


def base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_fits_its_loss_falls_and_its_adapter_applies_to_the_unmodified_base(fits, name, tiny_model_dir):
    from peft import PeftModel

    from healthai.adapter import Adapter

    cli, folder = fits[name]
    loss = [v for _, v in scalars(folder / "tiny" / "version_0")["train/loss"]]
    assert len(loss) == STEPS and loss[-1] < 0.8 * loss[0], loss
    adapter = folder / "tiny" / "version_0" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    moved = name in ("pissa", "olora")
    assert config["use_dora"] == (name == "dora") and config["use_rslora"] == (name in ("rslora", "olora"))
    # PiSSA/OLoRA: saved converted, a plain LoRA of twice the rank with the same scaling, initialised as plain LoRA.
    assert config["r"] == (16 if moved else 8)
    assert config["init_lora_weights"] == ("gaussian" if name == "gaussian" else True)
    trained = cli.model.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=IDS).logits
        folder_logits = PeftModel.from_pretrained(base_model(tiny_model_dir), adapter).eval()(input_ids=IDS).logits
        ckpt = Adapter.open(folder / "ckpt" / "last.ckpt").apply(base_model(tiny_model_dir))
        ckpt_logits = ckpt(input_ids=IDS).logits
        plain = base_model(tiny_model_dir)(input_ids=IDS).logits
    # Moved, the trained model is W_res + s B A, the saved one W + s (B A - B0 A0): float32 rounding apart.
    tolerance = PARITY_ATOL if moved else 1e-5
    assert (folder_logits - expected).abs().max() <= tolerance
    assert (ckpt_logits - expected).abs().max() <= tolerance
    assert (folder_logits - plain).abs().max() > 0.1  # the adapter changes the model


@pytest.mark.parametrize("name", ["dora", "rslora", "pissa"])
def test_export_merge_parity_holds_within_the_plain_lora_tolerance(fits, name, tmp_path):
    from healthai.export import export

    adapter = fits[name][1] / "tiny" / "version_0" / "adapter"
    with contextlib.redirect_stdout(io.StringIO()):
        summary = export(adapter=adapter, out=tmp_path / "merged", parity_records=2, parity_max_tokens=160)
    assert summary["max_abs_diff"] <= PARITY_ATOL and summary["adapter_effect"] > 0.1, summary


def test_a_dora_adapter_merged_for_inference_gives_the_unmerged_logits(fits, tiny_model_dir):
    from healthai.model import DiagnosisLoRA

    adapter = fits["dora"][1] / "tiny" / "version_0" / "adapter"
    module = DiagnosisLoRA(str(tiny_model_dir), adapter_path=str(adapter), dtype="float32",
                           gradient_checkpointing=False)  # fmt: skip
    module.configure_model()
    module.eval()
    with torch.no_grad():
        unmerged = module.model(input_ids=IDS).logits
        assert module.merge_lora_for_inference() and module.lora_merged()
        merged = module.model(input_ids=IDS).logits
        module.unmerge_lora()
        again = module.model(input_ids=IDS).logits
    assert (merged - unmerged).abs().max() <= PARITY_ATOL
    assert (again - unmerged).abs().max() <= 1e-4  # unmerging subtracts the update again: rounding


@pytest.mark.parametrize("name, change, named", [
    ("dora", ["--model.lora_variant", "lora"], "(variant 'dora', now 'lora')"),
    ("pissa", [], "(init 'pissa', now 'default')"),
])  # fmt: skip
def test_a_resume_with_another_variant_or_init_is_refused_in_one_line(fits, name, change, named, tiny_model_dir,
                                                                       tmp_path, capfd):  # fmt: skip
    # `--ckpt_path last` (a file's path is refused the same way: fit resumes with the options given, #29 item 1).
    (tmp_path / "ckpt").mkdir()
    shutil.copy(fits[name][1] / "ckpt" / "last.ckpt", tmp_path / "ckpt" / "last.ckpt")
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(4))
    code, line = run_main(fit_args(tmp_path, tiny_model_dir, train, "--trainer.max_steps", str(STEPS + 1),
                                   "--ckpt_path", "last", *change), capfd)  # fmt: skip
    assert code == 2 and line.startswith("healthai fit: error: --ckpt_path ") and named in line, line


def test_a_pissa_resume_rebuilds_the_checkpoints_residual_whatever_svd_this_run_draws(tiny_model_dir, monkeypatch):
    """PiSSA's SVD is randomised: a resume that drew another one (another seed, machine or PEFT) must still continue on
    the base the checkpoint's weights were trained against, and convert with its initial weights."""
    from healthai import lora_variants
    from healthai.model import DiagnosisLoRA

    def built():
        module = DiagnosisLoRA(str(tiny_model_dir), dtype="float32", lora_init="pissa", lora_r=4, lora_alpha=8,
                               gradient_checkpointing=False)  # fmt: skip
        module.configure_model()
        return module

    def base_weights(module):
        return {n: p.detach().clone() for n, p in module.model.named_parameters() if "base_layer" in n}

    first = built()
    monkeypatch.setattr(lora_variants, "INIT_SEED", 1)
    other = built()
    w1, w2 = base_weights(first), base_weights(other)
    assert max(float((w1[n] - w2[n]).abs().max()) for n in w1) > 1e-4  # another SVD: another residual
    other._restore_initial_lora(first._initial_lora, "x.ckpt")
    w2 = base_weights(other)
    assert max(float((w1[n] - w2[n]).abs().max()) for n in w1) < 1e-5
    assert other._initial_lora is first._initial_lora


@pytest.mark.slow
def test_dora_under_fsdp_on_two_cpu_processes_trains_as_one_plain_process(tmp_path, tiny_model_dir, forkserver):
    """DoRA's magnitude vectors are sharded with their decoder layer (FSDP2) and its weight norms computed on the
    gathered weights: 2 gloo ranks of batch 2 train the same adapter as one process of batch 4 (test_fsdp's pattern,
    with its tiny clipping norm, so a norm taken over one shard would show)."""
    from safetensors.torch import load_file

    from test_fsdp import fit_args as fsdp_fit_args

    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(8))
    dora = ["--model.lora_variant", "dora", "--model.generate_every_n_epochs", "0", "--data.val_overlap", "keep"]
    sharded = ["--config", "configs/qwen_lora_fsdp.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
               "--trainer.precision", "32-true", *dora]  # fmt: skip
    forkserver.run_ranks(["-m", "healthai", *fsdp_fit_args(tmp_path, tiny_model_dir, train, train, "fsdp", 2, 2,
                                                           sharded)], nprocs=2)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cli_main(fsdp_fit_args(tmp_path, tiny_model_dir, train, train, "plain", 4, 2, dora))
    finally:
        torch.set_num_threads(threads)
    got, plain = (load_file(tmp_path / run / "tiny" / "version_0" / "adapter" / "adapter_model.safetensors")
                  for run in ("fsdp", "plain"))  # fmt: skip
    assert got.keys() == plain.keys() and any("lora_magnitude_vector" in k for k in got)
    for key in plain:
        assert torch.allclose(got[key], plain[key], rtol=1e-4, atol=1e-6), key


def test_dora_on_a_4bit_base_trains_its_lora_and_magnitude_weights(tiny_model_dir, tokenizer):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e .[qlora])")
    from test_qlora import _skip_without_cpu_4bit, one_batch

    from healthai.model import DiagnosisLoRA

    _skip_without_cpu_4bit()
    module = DiagnosisLoRA(model_name_or_path=str(tiny_model_dir), quantization="nf4", dtype="float32",
                           lora_variant="dora", gradient_checkpointing=False, lora_r=4, lora_alpha=8)  # fmt: skip
    module.configure_model()
    module.answer_loss(one_batch(tokenizer)).backward()
    trained = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trained)
    # B starts at zero, so A's first gradient is zero too; B's and the magnitudes' are not.
    assert all(g is not None and g.abs().sum() > 0 for n, g in trained.items() if "lora_A" not in n)


@pytest.mark.parametrize("extra, named", [
    (["--model.lora_init", "pissa", "--model.quantization", "nf4"],
     "model.lora_init pissa cannot start from a nf4 base"),
    (["--model.lora_init", "olora", "--model.lora_variant", "dora"],
     "model.lora_init olora with model.lora_variant dora"),
    (["--config", "configs/qwen_lora_fsdp.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
      "--model.lora_init", "pissa"], "model.lora_init pissa is not supported with healthai.sharding.LoRAFSDPStrategy"),
])  # fmt: skip
def test_a_combination_that_cannot_run_is_refused_at_start_in_one_line(extra, named, tiny_model_dir, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    from healthai.model import DiagnosisLoRA

    monkeypatch.setattr(DiagnosisLoRA, "configure_model", lambda self: pytest.fail("the model was loaded"))
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(2))
    with pytest.raises(ConfigError) as info:
        cli_main(fit_args(tmp_path, tiny_model_dir, train, *extra))
    message = str(info.value)
    assert message.startswith(named) and "\n" not in message, message
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("extra, expected", [
    (["--model.lora_variant", "dora", "--model.lora_init", "gaussian"],
     {"lora_variant": "dora", "lora_init": "gaussian"}),
    (["--model.lora_variant", "rslora", "--model.lora_init", "pissa"],
     {"lora_variant": "rslora", "lora_init": "pissa"}),
    (["--model.lora_init", "olora", "--model.neftune_alpha", "5"], {"lora_init": "olora", "neftune_alpha": 5.0}),
    ([], {"lora_variant": "lora", "lora_init": "default", "neftune_alpha": None}),
])  # fmt: skip
def test_the_options_parse_from_the_command_line(extra, expected):
    import yaml

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["fit", "--config", "configs/tiny.yaml", *extra, "--print_config"])
    model = yaml.safe_load(out.getvalue())["model"]
    assert {k: model[k] for k in expected} == expected


def test_the_options_parse_from_a_yaml_config(tmp_path):
    """The same options as a user's config file holds them, packing included, on top of configs/tiny.yaml."""
    import yaml

    config = tmp_path / "variants.yaml"
    config.write_text("model:\n  lora_variant: rslora\n  lora_init: olora\n  neftune_alpha: 10\n"
                      "data:\n  packing: true\n", encoding="utf-8")  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["fit", "--config", "configs/tiny.yaml", "--config", str(config), "--print_config"])
    parsed = yaml.safe_load(out.getvalue())
    assert {k: parsed["model"][k] for k in ("lora_variant", "lora_init", "neftune_alpha")} == {
        "lora_variant": "rslora", "lora_init": "olora", "neftune_alpha": 10.0}
    assert parsed["data"]["packing"] is True


def test_an_unknown_variant_is_a_parse_error_naming_the_option():
    from argparse import ArgumentError
    from typing import get_args, get_type_hints

    from healthai.lora_variants import LoraInit, LoraVariant
    from healthai.model import DiagnosisLoRA

    hints = get_type_hints(DiagnosisLoRA.__init__)  # the CLI's choices are the module's
    assert get_args(hints["lora_variant"]) == get_args(LoraVariant)
    assert get_args(hints["lora_init"]) == get_args(LoraInit)

    with pytest.raises(ArgumentError, match=r"(?s)model\.lora_variant.*lokr"):
        cli_main(["fit", "--config", "configs/tiny.yaml", "--model.lora_variant", "lokr", "--print_config"])


# -- NEFTune ----------------------------------------------------------------------------------------------------------


def test_neftune_noises_training_forwards_only(tiny_model_dir, tokenizer):
    """The hook fit registers: the training loss changes, the eval-mode loss and generated answers do not, and
    teardown takes it off."""
    from healthai.batching import pad_batch
    from healthai.encoding import encode_example, prompt_ids
    from healthai.generation import GenerationSettings
    from healthai.model import DiagnosisLoRA
    from healthai.prompts import PromptStyle

    module = DiagnosisLoRA(str(tiny_model_dir), dtype="float32", gradient_checkpointing=True, lora_dropout=0.0,
                           neftune_alpha=5.0, generation=GenerationSettings(max_new_tokens=24))  # fmt: skip
    module.configure_model()
    record = labelled_records(1)[0]
    example = encode_example(tokenizer, PromptStyle(), record["feature_content"], record["diseases"],
                             record["reason"], max_length=160)  # fmt: skip
    ids = torch.tensor([example["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([example["labels"]])}
    prompts = [prompt_ids(tokenizer, PromptStyle(), r["feature_content"][:200]) for r in seed_records(2)]
    prompt = (pad_batch(prompts, tokenizer.pad_token_id, "left"), pad_batch([[1] * len(p) for p in prompts], 0, "left"))

    def observe():
        module.train()
        train_loss = float(module.answer_loss(batch).detach())
        module.eval()
        with torch.no_grad():
            eval_loss = float(module.answer_loss(batch))
        module.train()  # generate_answers switches to eval mode itself
        answers = [(a.diseases, a.reason, a.completion_tokens) for a in module.generate_answers(*prompt)]
        return train_loss, eval_loss, answers

    without = observe()
    module.on_fit_start()
    torch.manual_seed(0)
    noised = observe()
    assert module.training  # generation put training mode back
    assert noised[0] != pytest.approx(without[0], abs=1e-4)
    assert noised[1:] == without[1:]
    module.teardown("fit")
    assert observe() == without


def test_neftune_in_fit_changes_the_training_loss_not_validation_nor_predict(tiny_model_dir, tmp_path):
    """Two fits with learning rate 0 (the weights never change, so only the noise can differ): the training loss
    differs, every validation loss is equal; predict with the option set answers as without."""
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(4))
    logged = {}
    for name, extra in (("off", []), ("on", ["--model.neftune_alpha", "10"])):
        cli_main(fit_args(tmp_path / name, tiny_model_dir, train, "--trainer.max_steps", "2",
                          "--trainer.check_val_every_n_epoch", "1", "--model.learning_rate", "0", *extra))  # fmt: skip
        logged[name] = scalars(tmp_path / name / "tiny" / "version_0")
    first_step = {name: logged[name]["train/loss"][0][1] for name in logged}
    assert first_step["on"] != pytest.approx(first_step["off"], abs=1e-4), first_step
    assert len(logged["on"]["val/loss"]) == 2 and logged["on"]["val/loss"] == logged["off"]["val/loss"]

    records = write_jsonl(tmp_path / "records.jsonl", seed_records(2, offset=30))
    adapter = tmp_path / "on" / "tiny" / "version_0" / "adapter"
    for name, extra in (("off", []), ("on", ["--model.neftune_alpha", "10"])):
        cli_main(["predict", "--config", "configs/predict_tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
                  "--model.adapter_path", str(adapter), "--data.predict_file", str(records), "--writer.progress",
                  "false", "--model.generation.max_new_tokens", "24", "--writer.output_path",
                  str(tmp_path / f"pred-{name}.jsonl"), *extra])  # fmt: skip
    assert read_jsonl(tmp_path / "pred-on.jsonl") == read_jsonl(tmp_path / "pred-off.jsonl")
