"""``healthai.adapter.Adapter``: one object answers what a command asks of an adapter, whether it is a folder or a fit
``.ckpt`` — and the prompt rule is the same in every command (data module, export, serve)."""

from __future__ import annotations

import dataclasses
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from conftest import seed_records, write_jsonl
from healthai.adapter import CKPT_KEY, Adapter, base_record
from healthai.errors import UserError
from healthai.prompts import PromptStyle

# Not the default style, so that a test can tell the adapter's own prompt from the default.
PROMPT = PromptStyle(system="你是医生。只输出JSON。", user_template="病例：\n{case}\n请诊断。")
NO_PROMPT_WARNING = "records no prompt settings; using the default prompt"


def _lora(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(base, config), config


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """One random non-zero LoRA adapter on the small model twice: as fit's ``adapter/`` folder (weights, tokenizer,
    prompt.json, base.json) and as a fit ``.ckpt`` holds it (LoRA settings, weights, the base and prompt record)."""
    from transformers import AutoTokenizer

    model, config = _lora(tiny_model_dir)
    root = tmp_path_factory.mktemp("adapter_object")
    folder = root / "adapter"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    PROMPT.save(folder)
    base = base_record(str(tiny_model_dir))
    (folder / "base.json").write_text(json.dumps(base))
    hparams = {"lora_r": 4, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
               "target_modules": ["q_proj", "v_proj"], "adapter_path": None}  # fmt: skip
    weights = {f"model.{n}": p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    ckpt = root / "adapter.ckpt"
    torch.save({"state_dict": weights, "hyper_parameters": hparams,
                CKPT_KEY: {"base": base, "prompt": dataclasses.asdict(PROMPT)}}, ckpt)  # fmt: skip
    return folder, ckpt


def test_a_folder_and_its_checkpoint_give_the_same_base_prompt_tokenizer_and_weights(pair, tiny_model_dir, capfd):
    from transformers import AutoModelForCausalLM

    folder, ckpt = Adapter.open(pair[0]), Adapter.open(pair[1])
    assert (folder.kind, ckpt.kind) == ("folder", "checkpoint")
    assert folder.base == ckpt.base == base_record(str(tiny_model_dir))
    assert folder.resolve_base(None, "--base") == ckpt.resolve_base(None, "--base") == str(tiny_model_dir)
    assert folder.prompt == ckpt.prompt == PROMPT
    # The folder carries the tokenizer it was trained with; a .ckpt holds none, so the base's is used.
    assert folder.tokenizer_source(str(tiny_model_dir)) == str(pair[0])
    assert ckpt.tokenizer_source(str(tiny_model_dir)) == str(tiny_model_dir)
    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)

    applied = [folder.apply(load()), ckpt.apply(load())]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        plain = load()(input_ids=ids).logits
        logits = [model(input_ids=ids).logits for model in applied]
    assert torch.allclose(logits[0], logits[1], atol=1e-6)
    assert not torch.allclose(logits[0], plain, atol=1e-3)  # the adapter is applied, not skipped
    assert not any(p.requires_grad for model in applied for p in model.parameters())
    assert folder.check_base(str(tiny_model_dir), False, "--allow_base_mismatch") is None  # its own base
    assert NO_PROMPT_WARNING not in capfd.readouterr().err


def test_open_refuses_what_is_not_an_adapter_naming_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope: no such adapter folder \(--adapter\)$"):
        Adapter.open(tmp_path / "nope", "--adapter")
    with pytest.raises(FileNotFoundError, match=r"gone.ckpt: no such checkpoint file \(--model.adapter_path\)$"):
        Adapter.open(tmp_path / "gone.ckpt")
    with pytest.raises(FileNotFoundError, match=r"not an adapter folder \(no adapter_config.json\)"):
        Adapter.open(tmp_path, "--adapter_path")


@pytest.mark.parametrize("content, message", [
    ("{not json", "unreadable prompt settings"),
    ('{"system": "s", "user_template": "no case"}', "must contain '{case}'"),
    ('{"sistem": "typo"}', "unknown prompt settings ['sistem']"),
])  # fmt: skip
def test_an_unreadable_prompt_json_is_one_line_naming_the_file(pair, tmp_path, content, message):
    import shutil

    folder = Path(shutil.copytree(pair[0], tmp_path / "adapter"))
    (folder / "prompt.json").write_text(content)
    with pytest.raises(UserError) as refused:
        Adapter.open(folder).prompt
    assert str(refused.value).startswith(f"{folder / 'prompt.json'}: ") and message in str(refused.value)
    assert "\n" not in str(refused.value)


def _prompt_of_data_module(adapter: Path, tiny_model_dir: Path, tmp_path: Path) -> PromptStyle:
    from healthai.data import DiagnosisDataModule

    return DiagnosisDataModule(tokenizer_path=str(tiny_model_dir), adapter_path=str(adapter)).prompt


def _prompt_of_export(adapter: Path, tiny_model_dir: Path, tmp_path: Path) -> PromptStyle:
    from healthai.export import export

    records = write_jsonl(tmp_path / "records.jsonl", seed_records(1))
    with redirect_stdout(io.StringIO()):
        export(adapter=adapter, out=tmp_path / "merged", records=records, parity_records=1, parity_max_tokens=128)
    return PromptStyle.load(tmp_path / "merged")  # the prompt export checked parity with and saved beside the model


def _prompt_of_serve(adapter: Path, tiny_model_dir: Path, tmp_path: Path) -> PromptStyle:
    pytest.importorskip("litserve")
    from healthai.generation import GenerationSettings
    from healthai.serve import check_startup

    return check_startup(str(tiny_model_dir), str(adapter), GenerationSettings(), 2048, False)


@pytest.mark.parametrize("command", ["data", "export", "serve"])
def test_an_adapter_without_saved_prompt_gets_the_default_prompt_and_one_warning_in_every_command(
    pair, tiny_model_dir, tmp_path, capfd, command
):
    """A PEFT folder written by another tool has no prompt.json: every command uses the default prompt and says so
    once, naming the adapter (before: the data module and serve refused it, export used the default silently)."""
    import shutil

    adapter = Path(shutil.copytree(pair[0], tmp_path / "foreign"))
    (adapter / "prompt.json").unlink()
    run = {"data": _prompt_of_data_module, "export": _prompt_of_export, "serve": _prompt_of_serve}[command]
    assert run(adapter, tiny_model_dir, tmp_path) == PromptStyle()
    warnings = [line for line in capfd.readouterr().err.splitlines() if NO_PROMPT_WARNING in line]
    assert warnings == [f"warning: adapter {adapter} {NO_PROMPT_WARNING} (no prompt.json; if it was trained with "
                        f"another prompt, save that as {adapter / 'prompt.json'})"]  # fmt: skip


def test_the_warning_comes_from_the_first_process_only(pair, tmp_path, capfd, monkeypatch):
    """Under DDP/FSDP every rank opens the adapter: one warning line, not one per rank; the prompt is the same."""
    import shutil

    from lightning.fabric.utilities.rank_zero import rank_zero_only

    adapter = Path(shutil.copytree(pair[0], tmp_path / "foreign"))
    (adapter / "prompt.json").unlink()
    for rank, lines in ((1, 0), (0, 1)):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        assert Adapter.open(adapter, "--model.adapter_path").prompt == PromptStyle()
        assert capfd.readouterr().err.count(NO_PROMPT_WARNING) == lines, f"rank {rank}"
