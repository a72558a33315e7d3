"""The JSON constraint's own batched logits processor (:class:`healthai.decoding.JsonLogitsProcessor`): the same greedy
answers as xgrammar's ``contrib.hf`` processor on all 96 fixture records, one host transfer per decode step, finished
rows skipped, and a CPU masking that matches xgrammar's kernel bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import built_on_one_thread, seed_records

# Calls that move a tensor's data to the host (on a GPU: a device sync each).
HOST_TRANSFERS = {"item", "tolist", "cpu", "numpy", "to", "__int__", "__float__", "__bool__", "__index__", "__array__"}


class Recording(torch.Tensor):
    """A tensor that records the torch functions and methods called on it (and on what is computed from it)."""

    calls: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.fixture(scope="module")
def lit(tiny_model_dir):
    """The small model as predict builds it (one load for the module), with a small budget; one torch thread (on a
    busy shared CPU, a second OpenMP thread makes the small model's ops wait: 5x slower here)."""
    from healthai.generation import GenerationSettings
    from healthai.model import DiagnosisLoRA

    settings = GenerationSettings(max_new_tokens=56)
    module = DiagnosisLoRA(str(tiny_model_dir), dtype="float32", gradient_checkpointing=False, generation=settings)
    yield from built_on_one_thread(module)


def prompt_batches(lit, records: list[dict], batch_size: int):
    """Left-padded prompt batches of ``records``, sorted by length as the data module sorts them."""
    from healthai.batching import pad_batch
    from healthai.encoding import prompt_ids
    from healthai.prompts import PromptStyle

    prompts = sorted((prompt_ids(lit.tokenizer, PromptStyle(), r["feature_content"]) for r in records), key=len)
    for i in range(0, len(prompts), batch_size):
        ids = prompts[i : i + batch_size]
        yield pad_batch(ids, lit.tokenizer.pad_token_id, "left"), pad_batch([[1] * len(s) for s in ids], 0, "left")


def generated_ids(lit, batches, processor_factory) -> list[list[int]]:
    """Every row's new token ids (padding after the end of the answer included), with the given processor."""
    from healthai.encoding import end_of_turn_id

    rows = []
    for input_ids, mask in batches:
        pad = lit.tokenizer.pad_token_id
        config = lit.generation.transformers_config([end_of_turn_id(lit.tokenizer), pad], pad)
        lit.base_model.generation_config = config
        out = lit.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                 logits_processor=[processor_factory()])  # fmt: skip
        rows += out[:, input_ids.shape[1] :].tolist()
    return rows


@pytest.mark.slow
def test_greedy_answers_on_the_96_fixture_records_are_token_identical_to_xgrammars_hf_processor(lit):
    from xgrammar.contrib.hf import LogitsProcessor

    from healthai.decoding import JsonLogitsProcessor
    from healthai.encoding import end_of_turn_id

    records = seed_records(96)
    constraint, budget = lit.constraint(), lit.generation.budget
    with torch.no_grad():
        ours = generated_ids(lit, list(prompt_batches(lit, records, 24)),
                             lambda: JsonLogitsProcessor(constraint.compiled, constraint.closer, budget))  # fmt: skip
        theirs = generated_ids(lit, list(prompt_batches(lit, records, 24)),
                               lambda: LogitsProcessor(constraint.compiled))  # fmt: skip
    # Until the budget can matter (the last steps, where only tokens after which the answer can still close are
    # allowed) the two mask alike; xgrammar's processor then runs out of tokens inside a string.
    free = budget - constraint.closer.most_need
    assert len(ours) == 96 and [r[:free] for r in ours] == [r[:free] for r in theirs]
    assert any(len(r) == budget and end_of_turn_id(lit.tokenizer) not in r for r in theirs)  # it cut some answers
    texts = lit.tokenizer.batch_decode(ours, skip_special_tokens=True)
    assert all(json.loads(t) for t in texts), texts  # ours: every row strict JSON


def test_a_decode_step_moves_the_last_tokens_to_the_host_once_and_skips_finished_rows(lit, monkeypatch):
    """Through the project's generate (predict, validation and serve share it), on the branch a GPU takes: per step
    one ``tolist`` of the last tokens (also in the steps where the budget narrows a row), no ``.item()`` per row, no
    transfer of the scores; the bitmask is allocated once; a row whose answer has
    ended is no longer advanced or masked."""
    from healthai.encoding import end_of_turn_id
    from healthai.decoding import JsonConstraint

    steps: list[dict] = []
    make = JsonConstraint.logits_processor

    def recording_processor(self, budget):
        processor = make(self, budget)
        processor.device_kernel = True  # the branch a GPU takes (xgrammar's kernel), here on the CPU

        def call(input_ids, scores):
            Recording.calls = []
            out = processor(input_ids.as_subclass(Recording), scores.as_subclass(Recording))
            steps.append({"transfers": [c for c in Recording.calls if c in HOST_TRANSFERS],
                          "live": len(getattr(processor, "live", ())),
                          "mask": id(getattr(processor, "host_mask", 0))})  # fmt: skip
            return out.as_subclass(torch.Tensor)

        call.truncated = processor.truncated  # read once after generate (not a step)
        return call

    monkeypatch.setattr(JsonConstraint, "logits_processor", recording_processor)
    outputs = []
    generate = lit.model.generate
    monkeypatch.setattr(lit.model, "generate", lambda **kw: outputs.append(generate(**kw)) or outputs[-1])
    (input_ids, mask), *_ = prompt_batches(lit, seed_records(6), 6)
    answers = lit.generate_answers(input_ids, mask)
    # Strict JSON; the budget closed some rows (steps near it narrow masks: still one transfer per step).
    assert all(a.status in ("ok", "truncated") for a in answers) and any(a.status == "truncated" for a in answers)

    assert steps[0]["transfers"] == []  # the first call only sets up: nothing generated yet
    assert all(s["transfers"] == ["tolist"] for s in steps[1:]), [s["transfers"] for s in steps]
    assert len({s["mask"] for s in steps}) == 1
    # At call t (tokens 0..t-1 written), a row is live until it has written its end-of-turn token.
    new = outputs[0][:, input_ids.shape[1] :].tolist()
    eot = end_of_turn_id(lit.tokenizer)
    ends = [row.index(eot) if eot in row else len(row) for row in new]
    assert len(set(ends)) > 1  # rows end at different steps, so skipping is exercised
    assert [s["live"] for s in steps] == [sum(e >= t for e in ends) for t in range(len(steps))]


@pytest.mark.parametrize("allowed_share", [0.0, 0.05, 0.5, 0.97, 1.0])
def test_cpu_masking_matches_xgrammars_kernel(allowed_share):
    """Rows with few allowed tokens take another path than xgrammar's kernel; the result is the same, bit for bit, and
    rows outside ``rows`` are left alone; so it is again when the ids come from the index of an earlier step."""
    import numpy as np
    import xgrammar as xgr

    from healthai.decoding import MaskIndex, apply_bitmask_cpu

    gen = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word is partial
    allowed = torch.rand(5, vocab, generator=gen) < allowed_share
    allowed[1] = torch.rand(vocab, generator=gen) < 0.01  # one sparse row in every batch
    # Bits past the vocabulary set (allowed): xgrammar 0.2.9's CPU kernel writes a blocked one into the next row.
    padded = torch.ones(5, xgr.get_bitmask_shape(5, vocab)[1] * 32, dtype=torch.bool)
    padded[:, :vocab] = allowed
    # xgrammar's layout: token t is bit t % 32 of word t // 32 (little-endian words).
    bitmask = torch.from_numpy(np.packbits(padded.numpy(), axis=-1, bitorder="little").view(np.int32).copy())
    scores = torch.randn(5, vocab, generator=gen)
    expected = scores.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab, indices=[0, 1, 3])
    index = MaskIndex(vocab)
    again = scores.clone()
    apply_bitmask_cpu(scores, bitmask, [0, 1, 3], vocab, index)
    assert torch.equal(scores, expected)
    assert torch.equal(scores[0] == float("-inf"), ~allowed[0])
    assert len(index.entries) == len({bitmask[r].numpy().tobytes() for r in (0, 1, 3)})
    apply_bitmask_cpu(again, bitmask, [0, 1, 3], vocab, index)  # every row found in the index
    assert torch.equal(again, expected)
