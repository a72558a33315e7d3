"""Predict: every id exactly once, always-parseable JSON, resume after SIGKILL, batch invariance, key order."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import built_on_one_thread, REPO, read_jsonl, seed_records, write_jsonl
from healthai.cli import cli_main
from healthai.decoding import parse_answer
from healthai.generation import GenerationSettings
from healthai.writer import SUBMISSION_KEYS


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def predict_args(tiny_model_dir, records: Path, out: Path, *extra: str) -> list[str]:
    return [
        "predict", "--config", "configs/predict_tiny.yaml",
        "--model.model_name_or_path", str(tiny_model_dir),
        "--data.predict_file", str(records), "--writer.output_path", str(out),
        "--writer.progress", "false", "--model.generation.max_new_tokens", "48", *extra,
    ]  # fmt: skip


def test_every_id_exactly_once_in_input_order_and_every_row_parses(tmp_path, tiny_model_dir):
    records = seed_records(20, offset=10)
    src = write_jsonl(tmp_path / "records.jsonl", records)
    out = tmp_path / "pred.jsonl"
    cli_main(predict_args(tiny_model_dir, src, out, "--data.eval_batch_size", "8"))
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [r["id"] for r in records]  # once each, in input order
    for row, record in zip(rows, records):
        assert tuple(row)[:5] == SUBMISSION_KEYS
        assert row["feature_content"] == record["feature_content"]
        # Constrained decoding: even random weights give strict JSON; the noise they write often runs into the
        # budget, which closes it (truncated: tests/test_answer_grammar.py checks the flag is exact).
        assert row["parse_status"] in ("ok", "truncated"), row
        assert isinstance(row["diseases"], str) and isinstance(row["reason"], str)
    assert not list(tmp_path.glob("pred.jsonl.rank*"))  # shards merged and removed


def predict_in_process(tiny_model_dir, records: Path, batch_sizes: tuple[int, ...]) -> dict[int, list[dict]]:
    """Rows of ``predict_step`` over the records at each batch size, in input order: the model and data module that
    ``predict --config configs/predict_tiny.yaml`` builds (its generation and data settings), built once, no CLI."""
    from healthai.data import DiagnosisDataModule
    from healthai.model import DiagnosisLoRA

    config = yaml.safe_load((REPO / "configs" / "predict_tiny.yaml").read_text(encoding="utf-8"))
    generation = GenerationSettings(**{**config["model"]["generation"], "max_new_tokens": 48})  # as predict_args
    model = DiagnosisLoRA(str(tiny_model_dir), dtype="float32", gradient_checkpointing=False,
                          generation=generation)  # fmt: skip
    model.configure_model()
    model.eval()
    outputs = {}
    for bs in batch_sizes:
        dm = DiagnosisDataModule(predict_file=str(records), tokenizer_path=str(tiny_model_dir), eval_batch_size=bs,
                                 max_length=config["data"]["max_length"])  # fmt: skip
        dm.setup("predict")
        rows = []
        with torch.no_grad():
            for i, batch in enumerate(dm.predict_dataloader()):
                rows += model.predict_step(batch, i)
        outputs[bs] = sorted(rows, key=lambda r: r["_order"])
    return outputs


def test_greedy_outputs_do_not_depend_on_batch_size(tmp_path, tiny_model_dir):
    # In-process: the batched generation is what is tested, not the CLI (the tests around it run the CLI).
    records = seed_records(6, offset=30)  # prompts of different lengths: a batch of 6 is left-padded unevenly
    src = write_jsonl(tmp_path / "records.jsonl", records)
    outputs = predict_in_process(tiny_model_dir, src, (1, 6))
    assert [r["id"] for r in outputs[1]] == [r["id"] for r in records]
    assert outputs[1] == outputs[6]


def test_rerun_after_sigkill_completes_every_id_exactly_once(tmp_path, tiny_model_dir, capsys, forkserver):
    records = seed_records(10, offset=42)
    src = write_jsonl(tmp_path / "records.jsonl", records)
    out = tmp_path / "pred.jsonl"
    shard = tmp_path / "pred.jsonl.rank0.jsonl"
    args = predict_args(tiny_model_dir, src, out, "--data.eval_batch_size", "2")
    # The killed run is a real process (a SIGKILL needs one; forked: tests/forkserver.py); the rerun is the same
    # command, in-process.
    proc = forkserver.start(["-m", "healthai", *args])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shard.exists() and len(shard.read_bytes().splitlines()) >= 2:  # one batch written, four to go
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and shard.exists(), "the run should have been killed mid-way"
    done_before = len(read_jsonl(shard))
    assert 0 < done_before < len(records)
    with open(shard, "ab") as f:  # what a kill in the middle of a write leaves: a torn last line
        f.write(b'{"id": 99999, "reason": "half a ro')
    capsys.readouterr()
    cli_main(args)
    assert f"{done_before} record(s) already done" in capsys.readouterr().out
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [r["id"] for r in records]


def test_output_with_ids_from_another_input_is_refused(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "records.jsonl", seed_records(3))
    out = write_jsonl(tmp_path / "pred.jsonl", [{"id": "not-an-input-id", "reason": "", "diseases": "",
                                                 "feature_content": "x", "parse_status": "ok"}])  # fmt: skip
    with pytest.raises(ValueError, match="not in the input"):
        cli_main(predict_args(tiny_model_dir, src, out))


def test_bad_predict_input_names_file_and_line_or_goes_to_rejects(tmp_path, tiny_model_dir):
    src = tmp_path / "records.jsonl"
    good = seed_records(2)
    src.write_text(json.dumps(good[0], ensure_ascii=False) + "\n" + '{"id": 7, "feature_content": ""}\n'
                   + json.dumps(good[1], ensure_ascii=False) + "\n", encoding="utf-8")  # fmt: skip
    out = tmp_path / "pred.jsonl"
    with pytest.raises(ValueError, match=r"records.jsonl:2: field 'feature_content' is empty"):
        cli_main(predict_args(tiny_model_dir, src, out))
    cli_main(predict_args(tiny_model_dir, src, out, "--data.on_bad_record", "skip"))
    assert [r["id"] for r in read_jsonl(out)] == [good[0]["id"], good[1]["id"]]
    assert read_jsonl(tmp_path / "records.rejects.jsonl")[0]["line"] == 2


@pytest.mark.parametrize(
    "text, status, diseases",
    [
        ('{"diseases": "高血压", "reason": "血压高"}', "ok", "高血压"),
        ('```json\n{"diseases": "高血压", "reason": "血压高"}\n```', "ok", "高血压"),
        ('{"diseases": ["高血压", "糖尿病"], "reason": "r"}', "ok", "高血压；糖尿病"),
        ('{"diseases": "高血压", "reason": "血压', "repaired", "高血压"),  # unconstrained, cut by max_new_tokens
        ('{"diseases": "胃炎", "reason": "上腹痛",}', "repaired", "胃炎"),
        ("诊断：高血压", "failed", None),
        ("", "failed", None),
        ('{"diagnosis": "高血压"}', "failed", None),
    ],
)
def test_parse_answer(text, status, diseases):
    parsed = parse_answer(text)
    assert parsed.status == status and parsed.diseases == diseases
    if status == "failed":
        assert parsed.raw == text and parsed.error


@pytest.fixture(scope="module")
def merge_lit(tmp_path_factory, tiny_model_dir):
    """The small model in float32 with a LoRA adapter of random, non-zero weights on all seven projections (as fit
    saves one), built as predict builds it; one torch thread."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from healthai.base_model import ALL_LINEAR
    from healthai.model import DiagnosisLoRA
    from healthai.prompts import PromptStyle

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapter = tmp_path_factory.mktemp("merge") / "adapter"
    config = LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(adapter)
    PromptStyle().save(adapter)
    settings = GenerationSettings(max_new_tokens=56)
    module = DiagnosisLoRA(str(tiny_model_dir), adapter_path=str(adapter), dtype="float32",
                           gradient_checkpointing=False, generation=settings)  # fmt: skip
    yield from built_on_one_thread(module)


def test_predict_generates_with_the_lora_merged_and_the_same_tokens_as_unmerged(merge_lit):
    """What predict's hook does (``on_predict_start``): the adapter is folded into the base weights, generate then runs
    no LoRA layer (the merged base layers stand in their place), and the greedy tokens in float32 are those of the unmerged layers on 24 fixture records (exactly:
    a difference in the logits' last bits could only flip a near tie, and none does here). ``on_predict_end`` undoes
    it, so the same module trains the adapter again."""
    from peft.tuners.lora import LoraLayer

    from healthai.batching import pad_batch
    from healthai.encoding import prompt_ids
    from healthai.prompts import PromptStyle

    lit = merge_lit
    prompts = sorted((prompt_ids(lit.tokenizer, PromptStyle(), r["feature_content"]) for r in seed_records(24)), key=len)
    batches = [(pad_batch(p, lit.tokenizer.pad_token_id, "left"), pad_batch([[1] * len(s) for s in p], 0, "left"))
               for p in (prompts[i : i + 8] for i in range(0, len(prompts), 8))]  # fmt: skip
    lora_calls = []
    layers = [m for m in lit.model.modules() if isinstance(m, LoraLayer)]
    hooks = [layer.lora_A["default"].register_forward_hook(lambda *_: lora_calls.append(1)) for layer in layers]

    def answers():
        return [a for ids, mask in batches for a in lit.generate_answers(ids, mask)]

    def weights():
        return [layer.get_base_layer().weight.clone() for layer in layers]

    base_weights = weights()
    unmerged = answers()
    assert lora_calls and not lit.lora_merged()
    with lit.model.disable_adapter():  # the adapter matters (the test can fail): shown on the first batch of 8
        ids, mask = batches[0]
        assert [a.raw for a in lit.generate_answers(ids, mask)] != [a.raw for a in unmerged[:8]]

    lit.on_predict_start()
    lora_calls.clear()
    merged = answers()
    assert lit.lora_merged() and lora_calls == []  # the LoRA weights are in the base weights, not run beside them
    assert not any(isinstance(m, LoraLayer) for m in lit.model.modules())
    assert all(not torch.equal(w, b) for w, b in zip(weights(), base_weights))
    assert [a.raw for a in merged] == [a.raw for a in unmerged]
    assert all(a.status in ("ok", "truncated") for a in merged)

    lit.on_predict_end()
    assert not lit.lora_merged() and len([m for m in lit.model.modules() if isinstance(m, LoraLayer)]) == len(layers)
    assert all(torch.allclose(w, b, atol=1e-6) for w, b in zip(weights(), base_weights))
    for hook in hooks:
        hook.remove()


def test_merge_for_inference_false_keeps_the_lora_layers_and_4_bit_bases_are_never_merged(merge_lit, monkeypatch):
    lit = merge_lit
    monkeypatch.setitem(lit.hparams, "merge_for_inference", False)
    assert lit.merge_lora_for_inference() is False and not lit.lora_merged()
    monkeypatch.setitem(lit.hparams, "merge_for_inference", True)
    monkeypatch.setitem(lit.hparams, "quantization", "nf4")
    assert lit.merge_lora_for_inference() is False and not lit.lora_merged()


def test_answers_that_end_by_themselves_are_ok_and_strict_json(merge_lit, monkeypatch):
    """Rows of the random model mostly run into the budget (``truncated``), where strict parsing is never the question.
    Here the even rows are steered (a logits bias ahead of the JSON constraint, from the 4th step on) to end each open
    string, so their answers end by themselves well within the budget: they must be ``ok``, and the raw text of every
    ``ok`` row must be strict JSON (``json.loads`` as it is, nothing repaired) holding the row's fields."""
    from healthai.batching import pad_batch
    from healthai.encoding import prompt_ids
    from healthai.prompts import PromptStyle

    lit = merge_lit
    quotes = torch.tensor(sorted(i for t, i in lit.tokenizer.get_vocab().items() if t.startswith('"')))

    class EndStrings:
        def __init__(self):
            self.step = 0

        def __call__(self, input_ids, scores):
            if self.step >= 3:
                scores[::2, quotes] += 100.0  # the grammar keeps only the quote tokens that end the string
            self.step += 1
            return scores

    generate = lit.model.generate

    def generate_steered(*args, logits_processor=None, **kwargs):
        return generate(*args, logits_processor=[EndStrings(), *(logits_processor or [])], **kwargs)

    monkeypatch.setattr(lit.model, "generate", generate_steered)
    prompts = [prompt_ids(lit.tokenizer, PromptStyle(), r["feature_content"][:80]) for r in seed_records(4, offset=60)]
    ids = pad_batch(prompts, lit.tokenizer.pad_token_id, "left")
    mask = pad_batch([[1] * len(p) for p in prompts], 0, "left")
    answers = lit.generate_answers(ids, mask)
    assert [a.status for a in answers[::2]] == ["ok", "ok"], [(a.status, a.raw) for a in answers]
    budget = lit.generation.budget
    for answer in answers:
        assert answer.status in ("ok", "truncated"), answer  # constrained: never repaired
        parsed = json.loads(answer.raw)  # strict: every constrained answer is strict JSON, ok ones included
        assert parsed == {"diseases": answer.diseases, "reason": answer.reason}, answer.raw
        if answer.status == "ok":
            assert answer.raw.endswith("}") and answer.completion_tokens < budget, answer
