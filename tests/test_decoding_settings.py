"""Decoding settings are the project's own: the small model brings Qwen2.5-7B-Instruct's config and generation config
(sampling, top_k 20, repetition_penalty 1.05), and none of it reaches predict; the length caps are checked against
the budget is checked against the adapter's labels at start-up."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from conftest import REPO, read_jsonl, seed_records, write_jsonl
from healthai.cli import cli_main
from healthai.generation import AnswerBudget, GenerationSettings, check_answer_budget, resolve_budget

QWEN7B = REPO / "scripts" / "qwen2.5-7b-instruct"


def _builder():
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_model_is_qwen7b_in_every_field_but_size(tiny_model_dir):
    from transformers import AutoConfig

    sizes = set(_builder().SIZE_FIELDS) | {"layer_types"}  # one layer type per layer
    ignore = {"transformers_version", "_name_or_path"}
    tiny = AutoConfig.from_pretrained(tiny_model_dir).to_dict()
    real = AutoConfig.from_pretrained(QWEN7B).to_dict()
    assert {k: v for k, v in tiny.items() if k not in sizes | ignore} == {
        k: v for k, v in real.items() if k not in sizes | ignore
    }
    assert real["vocab_size"] == 152064 and real["tie_word_embeddings"] is False  # what the comparison covers
    assert json.loads((tiny_model_dir / "generation_config.json").read_text()) == json.loads(
        (QWEN7B / "generation_config.json").read_text()
    )


def test_transformers_config_leaves_nothing_for_the_checkpoint_to_fill(tiny_model_dir):
    """generate() fills a passed config's unset fields from the model's generation_config.json (Qwen's here)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.generation_config.repetition_penalty == 1.05 and model.generation_config.top_k == 20
    ours = GenerationSettings().transformers_config([151645, 151643], 151643)
    merged, _ = model._prepare_generation_config(ours)
    assert (merged.do_sample, merged.repetition_penalty, merged.max_new_tokens) == (False, 1.0, 1024)
    sampled = GenerationSettings(do_sample=True, temperature=0.5, top_p=0.9, top_k=0)
    merged, _ = model._prepare_generation_config(sampled.transformers_config([151645], 151643))
    assert (merged.temperature, merged.top_p, merged.top_k, merged.repetition_penalty) == (0.5, 0.9, 0, 1.0)
    # The neutral config a careless caller would pass does inherit Qwen's penalty: what the above guards against.
    merged, _ = model._prepare_generation_config(GenerationConfig(do_sample=False))
    assert merged.repetition_penalty == 1.05


def _neutral_copy(tiny_model_dir: Path, dest: Path) -> Path:
    """The small model with a neutral generation config (greedy, no penalty) instead of Qwen's."""
    dest.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "generation_config.json":
            os.symlink(f, dest / f.name)
    neutral = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643, "do_sample": False}
    (dest / "generation_config.json").write_text(json.dumps(neutral))
    return dest


def test_predictions_with_qwens_generation_config_equal_those_with_a_neutral_one(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):  # fmt: skip
    monkeypatch.chdir(REPO)
    neutral = _neutral_copy(tiny_model_dir, tmp_path / "neutral")
    # Records on which the small model's greedy answer changes under Qwen's repetition_penalty 1.05 (the random
    # weights' logit margins are wide, so on most records a 5% penalty changes nothing), and two on which it does not.
    records = [seed_records(1, offset=i)[0] for i in (4, 17, 27, 0, 1)]
    src = write_jsonl(tmp_path / "records.jsonl", records)
    rows = {}
    for name, model in (("qwen", tiny_model_dir), ("neutral", neutral)):
        out = tmp_path / f"{name}.jsonl"
        cli_main(["predict", "--config", "configs/predict_tiny.yaml", "--model.model_name_or_path", str(model),
                  "--data.predict_file", str(src), "--writer.output_path", str(out), "--writer.progress", "false",
                  "--data.eval_batch_size", "5", "--data.max_length", "256",
                  "--model.generation.max_new_tokens", "112"])  # fmt: skip
        rows[name] = read_jsonl(out)
    assert [r["id"] for r in rows["qwen"]] == [r["id"] for r in records]
    assert rows["qwen"] == rows["neutral"]


def test_a_null_budget_is_the_adapters_else_the_default():
    recorded = AnswerBudget(max_new_tokens=300, longest_answer_tokens=250, longest_answer_id="a7")
    assert resolve_budget(GenerationSettings(), recorded).max_new_tokens == 300
    assert resolve_budget(GenerationSettings(), None).max_new_tokens == 1024
    assert resolve_budget(GenerationSettings(max_new_tokens=64), recorded).max_new_tokens == 64  # given: kept


def test_answer_budget_check_names_the_numbers(tokenizer):
    recorded = AnswerBudget(max_new_tokens=300, longest_answer_tokens=250, longest_answer_id="a7")
    assert check_answer_budget(tokenizer, GenerationSettings(max_new_tokens=250), recorded) is None
    message = check_answer_budget(tokenizer, GenerationSettings(max_new_tokens=200), recorded)
    assert message == ("generation.max_new_tokens=200 is below the longest answer the adapter was trained on (250 "
                       "tokens, id 'a7'): answers that long will be closed by the budget (parse_status truncated); "
                       "leave it null to use the adapter's budget (300)")  # fmt: skip
    unconstrained = check_answer_budget(tokenizer, GenerationSettings(max_new_tokens=200, constrained=False), recorded)
    assert "will be cut (parse_status repaired)" in unconstrained
    assert check_answer_budget(tokenizer, GenerationSettings(max_new_tokens=200)) is None  # no adapter: nothing known
    # {"diseases": "", "reason": ""} is 11 tokens, and the end-of-turn token one more.
    with pytest.raises(ValueError, match=r"max_new_tokens=11 is below the 12 tokens of an empty answer"):
        check_answer_budget(tokenizer, GenerationSettings(max_new_tokens=11))
    assert check_answer_budget(tokenizer, GenerationSettings(max_new_tokens=12)) is None


def test_predict_warns_at_start_up_when_the_budget_is_below_the_adapters_labels(tmp_path, tiny_model_dir,
                                                                              monkeypatch):  # fmt: skip
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(REPO)
    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    AnswerBudget(max_new_tokens=40, longest_answer_tokens=30, longest_answer_id=9).save(adapter)
    src = write_jsonl(tmp_path / "records.jsonl", seed_records(1))
    with pytest.warns(UserWarning, match=r"max_new_tokens=24 is below the longest answer the adapter was trained on "
                                         r"\(30 tokens, id 9\).*adapter's budget \(40\)"):  # fmt: skip
        cli_main(["predict", "--config", "configs/predict_tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
                  "--model.adapter_path", str(adapter), "--data.predict_file", str(src), "--writer.progress", "false",
                  "--writer.output_path", str(tmp_path / "p.jsonl"),
                  "--model.generation.max_new_tokens", "24"])  # fmt: skip
    # Left null (predict_tiny.yaml), the budget is the adapter's: the predictions file records it.
    cli_main(["predict", "--config", "configs/predict_tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
              "--model.adapter_path", str(adapter), "--data.predict_file", str(src), "--writer.progress", "false",
              "--writer.output_path", str(tmp_path / "q.jsonl")])  # fmt: skip
    meta = json.loads((tmp_path / "q.jsonl.meta.json").read_text(encoding="utf-8"))
    assert meta["generation"]["max_new_tokens"] == 40


@pytest.mark.parametrize("option,value", [("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
                                          ("temperature", -0.1), ("top_k", -1)])  # fmt: skip
def test_generation_options_out_of_range_are_one_line(option, value):
    """#29 item 12: these were tracebacks inside generate; now a ConfigError (exit 2) naming the option."""
    from healthai.errors import ConfigError

    with pytest.raises(ConfigError, match=f"generation.{option}") as caught:
        GenerationSettings(**{option: value})
    assert "\n" not in str(caught.value)
    GenerationSettings(temperature=0.0, top_k=0, repetition_penalty=1.05)  # the edges and Qwen's own stay valid
