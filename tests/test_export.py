"""``python -m healthai export`` on the small model: the merged folder is complete, reproduces base + adapter on
real records after a reload from disk, and a merge that went wrong stops the export with status 1."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, read_jsonl, seed_records, write_jsonl
from healthai.encoding import prompt_ids
from healthai.errors import UserError
from healthai.export import export
from healthai.generation import AnswerBudget
from healthai.model import ALL_LINEAR
from healthai.prompts import PromptStyle

PARITY_ATOL = 5e-4
"""A correct float32 merge of the small model differs from base + adapter by ~9e-5: float32 rounding amplified by its
random weights (both sides are ~5e-5 from a float64 computation). 1e-4 would leave almost no margin across CPUs and
BLAS builds; a wrong merge differs by whole units."""

# Not the default style, so that a test can tell the adapter's prompt.json was used and copied.
ADAPTER_PROMPT = PromptStyle(system="你是一名医生。只输出JSON。", user_template="病历：\n{case}")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter on the small model with random, non-zero A and B (no training needed to move the logits),
    saved as fit saves one: PEFT files, tokenizer, prompt.json and the answer budget (640 tokens)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    path = tmp_path_factory.mktemp("export") / "adapter"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    ADAPTER_PROMPT.save(path)
    AnswerBudget(max_new_tokens=640, longest_answer_tokens=600, longest_answer_id=7).save(path)
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    return path


@pytest.fixture(scope="module")
def exported(adapter_dir) -> tuple[dict, str, Path]:
    """One export with the default records and base (both found by the command): summary, stdout, folder."""
    out = adapter_dir.parent / "merged"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        summary = export(adapter=adapter_dir, out=out, parity_records=2, parity_max_tokens=160)
    return summary, stdout.getvalue(), out


def test_merged_folder_holds_safetensors_tokenizer_generation_config_and_prompt(exported, adapter_dir, tiny_model_dir):
    summary, _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "prompt.json"} <= names, names  # fmt: skip
    assert not any(n.startswith("adapter_") or n.endswith(".bin") for n in names), names  # a plain model, not PEFT
    assert PromptStyle.load(out) == ADAPTER_PROMPT
    assert summary["out"] == str(out) and summary["base"] == str(tiny_model_dir)
    expected_ids = [r["id"] for r in read_jsonl(REPO / "data" / "sample_val.jsonl")[:2]]
    assert summary["records"] == expected_ids


def test_reloaded_merged_model_matches_base_plus_adapter_and_differs_from_base(exported, adapter_dir, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary, _, out = exported
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([prompt_ids(tokenizer, ADAPTER_PROMPT, seed_records(1)[0]["feature_content"][:200])])
    with torch.no_grad():
        # dtype given: the small model's config says bfloat16, as the 7B's does.
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        plain = base(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(input_ids=ids).logits
    assert (merged - with_adapter).abs().max() <= PARITY_ATOL
    assert (merged - plain).abs().max() > 0.1  # the adapter is in the merged weights
    assert summary["max_abs_diff"] <= PARITY_ATOL
    assert summary["adapter_effect"] > 0.1


def test_export_prints_parity_figure_and_serving_commands(exported):
    summary, stdout, out = exported
    match = re.search(r"parity: max \|logits\(base \+ adapter\) - logits\(merged\)\| = (\S+) over 2 records", stdout)
    assert match, stdout
    assert float(match.group(1)) == pytest.approx(summary["max_abs_diff"], rel=1e-2, abs=1e-12)
    assert f"merged model saved to {out}" in stdout
    assert f"vllm serve {out} --served-model-name healthai" in stdout
    assert "python -m healthai label --base_url http://localhost:8000/v1 --model healthai" in stdout


def test_a_wrong_merge_fails_the_parity_check_with_status_1(adapter_dir, tmp_path, monkeypatch, capsys):
    """A perturbed weight after the merge (as a broken merge would leave) must stop the export, via the CLI."""
    from peft.tuners.lora import LoraModel

    from healthai.__main__ import main

    real_merge = LoraModel.merge_and_unload

    def broken_merge(self, *args, **kwargs):
        merged = real_merge(self, *args, **kwargs)
        with torch.no_grad():
            merged.model.layers[0].mlp.down_proj.weight[0, 0] += 0.5
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", broken_merge)
    records = write_jsonl(tmp_path / "records.jsonl", seed_records(1))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--adapter", str(adapter_dir), "--out", str(tmp_path / "merged"), "--records", str(records),
              "--parity_records", "1", "--parity_max_tokens", "96"])  # fmt: skip
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "does not reproduce base + adapter" in captured.err and "do not serve it" in captured.err
    assert "vllm serve" not in captured.out
    # The failed model was never renamed to --out, and its temporary folder is gone (#29 item 6).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]


def test_adapter_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"not an adapter folder \(no adapter_config\.json\) nor a \.ckpt"):
        export(adapter=tmp_path, out=tmp_path / "merged")
    with pytest.raises(UserError, match=r"nope: no such adapter folder \(--adapter\)"):
        export(adapter=tmp_path / "nope", out=tmp_path / "merged")


def test_generation_config_is_the_projects_not_the_bases(exported, tiny_model_dir):
    """The base ships Qwen's sampling config; the merged folder decodes as predict does (greedy, no penalty, and the
    answer budget fit saved with the adapter, so a server reading the file does not cut answers it was trained to
    write), in vLLM (which reads temperature, not do_sample) and in transformers' generate."""
    from transformers import AutoModelForCausalLM

    from healthai.generation import GenerationSettings

    _, _, out = exported
    assert json.loads((tiny_model_dir / "generation_config.json").read_text())["do_sample"] is True
    written = json.loads((out / "generation_config.json").read_text())
    assert written == {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                       "do_sample": False, "max_new_tokens": 640, "repetition_penalty": 1.0, "temperature": 0.0,
                       "top_p": 1.0}  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[151644, 8948, 198, 104383, 109478, 151645, 198, 151644, 77091, 198]])
    ours = GenerationSettings(max_new_tokens=12).transformers_config([151645, 151643], 151643)
    torch.manual_seed(0)
    with_file_defaults = model.generate(input_ids=ids, max_new_tokens=12)
    as_predict = model.generate(input_ids=ids, generation_config=ours)
    assert torch.equal(with_file_defaults, as_predict)


def test_default_parity_records_are_package_data_so_an_installed_package_has_them():
    # A non-editable install has the package folder but no data/ beside it: the default must come from the package,
    # and setup.cfg's package_data must ship it.
    import configparser
    import fnmatch

    import healthai
    from healthai.export import default_records_file

    package = Path(healthai.__file__).resolve().parent
    relative = default_records_file().resolve().relative_to(package).as_posix()
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg", encoding="utf-8")
    patterns = [p.strip() for p in config["options.package_data"]["healthai"].replace("\n", ",").split(",")]
    assert any(fnmatch.fnmatch(relative, p) for p in patterns if p), (relative, patterns)
    # The same case texts as the repository's sample records, in order (the copy must not drift).
    sample = read_jsonl(REPO / "data" / "sample_val.jsonl")
    sample = [{"id": r["id"], "feature_content": r["feature_content"]} for r in sample]
    assert read_jsonl(default_records_file()) == sample


def test_export_help_lists_its_flags(capsys):
    from healthai.__main__ import main

    with pytest.raises(SystemExit) as exited:  # in-process: the same main() the shell's `python -m healthai` runs
        main(["export", "--help"])
    out, err = capsys.readouterr()
    assert exited.value.code == 0, err
    for flag in ("--adapter", "--out", "--base", "--dtype", "--tolerance", "--parity_records", "--records"):
        assert flag in out, flag


# -- scripts/download_model.py (needs network to really run: only its argument handling is tested) -----------------


def _download_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("download_model", REPO / "scripts" / "download_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_download_script_help_parses(capsys):
    with pytest.raises(SystemExit) as exited:
        _download_script().main(["--help"])
    out, err = capsys.readouterr()
    assert exited.value.code == 0, err
    for flag in ("--source", "--model", "--out", "--revision", "huggingface", "modelscope"):
        assert flag in out, flag


def test_download_script_calls_the_chosen_hub_and_prints_the_fit_command(tmp_path, monkeypatch, capsys):
    import types

    calls = []
    fake = types.ModuleType("modelscope")
    fake.snapshot_download = lambda **kwargs: calls.append(kwargs) or kwargs["local_dir"]
    monkeypatch.setitem(sys.modules, "modelscope", fake)
    script = _download_script()
    out = tmp_path / "Qwen2.5-7B-Instruct"
    script.main(["--source", "modelscope", "--model", "Qwen/Qwen2.5-7B-Instruct", "--out", str(out)])
    assert calls == [{"model_id": "Qwen/Qwen2.5-7B-Instruct", "local_dir": str(out)}]
    printed = capsys.readouterr().out
    assert f"python -m healthai fit --config configs/qwen_lora.yaml --model.model_name_or_path {out}" in printed


def test_download_script_names_the_extra_when_the_client_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # makes `import modelscope` fail as if not installed
    with pytest.raises(SystemExit, match=r"pip install -e \.\[download\]"):
        _download_script().import_source("modelscope")
