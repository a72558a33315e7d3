"""Issue 28: any answer ``json.dumps`` writes is one the constrained decoder writes back token for token, and every
answer still closes within its token budget as strict JSON, ``truncated`` exactly when the budget ended it.

The processor is driven here without a model: each step's scores prefer one token (a memorised answer's next token,
or a "keep writing" token), and the token picked is the highest score after masking, as greedy decoding picks it.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from healthai.answer_grammar import STRING, AnswerLayout, answer_grammar
from healthai.prompts import answer_text

EOT = 151645  # <|im_end|>
PAD = 151643
VOCAB = 152064
EXAMPLES = REPO / "tests" / "fixtures" / "example_output.jsonl"

# Answers json.dumps writes with escapes, long fields and characters of every UTF-8 length.
HARD_ANSWERS = [
    ("1、慢性肾脏病2、2型糖尿病3、高血压病4、冠状动脉粥样硬化性心脏病5、高脂血症6、贫血7、骨质疏松8、脑梗死后遗症9、痛风"
     "10、甲状腺结节11、前列腺增生12、反流性食管炎", '1. 血肌酐升高；\n2. 自述"口干"；\n3. 尿蛋白\\阳性。'),
    ("发热", "1.\t体温正常（≥37.3℃）；\\n2. 无咳嗽\r\n3. \x01\x1f\x7f 㐀䶵龥鿕 😀 \u2028 / end"),
    ("", ""),
    ('"', "\\"),
]


@pytest.fixture(scope="module")
def constraint(tokenizer):
    from healthai.decoding import JsonConstraint

    return JsonConstraint(tokenizer, VOCAB, EOT)


def official_answers() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in EXAMPLES.read_text(encoding="utf-8").splitlines()]
    return [(r["diseases"], r["reason"]) for r in rows]


def answer_ids(tokenizer, diseases: str, reason: str) -> list[int]:
    """The tokens the model is trained on: the json.dumps text as the tokenizer splits it, then end-of-turn."""
    return tokenizer.encode(answer_text(diseases, reason), add_special_tokens=False) + [EOT]


def drive(constraint, wanted: list[list[int]], budget: int, filler: int, device_kernel=None):
    """Greedy decoding of ``len(wanted)`` rows through one processor: at step k a row's scores prefer
    ``wanted[row][k]`` (then ``filler``, a token that keeps a string open). Returns each row's tokens, up to and
    including the end-of-turn token, and the processor's truncated flags."""
    from healthai.decoding import JsonLogitsProcessor

    processor = JsonLogitsProcessor(constraint.compiled, constraint.closer, budget, mask_index=constraint.mask_index,
                                    device_kernel=device_kernel)  # fmt: skip
    rows = len(wanted)
    ids = torch.full((rows, 1), PAD)
    done = [False] * rows
    for step in range(budget):
        scores = torch.zeros(rows, VOCAB)
        for r in range(rows):
            scores[r, filler] = 1.0
            if step < len(wanted[r]):
                scores[r, wanted[r][step]] = 2.0
        picked = processor(ids, scores).argmax(-1)
        picked = torch.where(torch.tensor(done), torch.full_like(picked, PAD), picked)  # generate pads finished rows
        ids = torch.cat([ids, picked[:, None]], dim=1)
        done = [d or t == EOT for d, t in zip(done, picked.tolist())]
        if all(done):
            break
    out = [row[1:] for row in ids.tolist()]
    return [row[: row.index(EOT) + 1] if EOT in row else row for row in out], processor.truncated()


def filler_id(tokenizer) -> int:
    (token,) = tokenizer.encode("病", add_special_tokens=False)
    return token


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


# -- the grammar ------------------------------------------------------------------------------------------------------


def test_the_grammar_is_json_dumps_and_nothing_else(constraint):
    import xgrammar as xgr

    def accepts(text: str | bytes) -> bool:
        matcher = xgr.GrammarMatcher(constraint.compiled)
        return matcher.accept_string(text) and matcher.accept_token(EOT) and matcher.is_terminated()

    for diseases, reason in official_answers() + HARD_ANSWERS:
        assert accepts(answer_text(diseases, reason)), (diseases, reason)
    # Other spellings of the same JSON are not what the model was trained to write, and \ud800 is a lone surrogate.
    for other in ['{"diseases": "\\u4e2d", "reason": ""}', '{"diseases": "a\\/b", "reason": ""}',
                  '{"diseases": "\\ud800", "reason": ""}', '{"diseases": "\\u0020", "reason": ""}',
                  '{"diseases":"a", "reason": ""}', '{"reason": "", "diseases": ""}',
                  '{"diseases": "a\nb", "reason": ""}',
                  '{"diseases": "a", "reason": "b"} ']:  # fmt: skip
        assert not accepts(other), other


def test_the_grammar_is_built_from_the_answers_own_literals():
    assert AnswerLayout().parts == [b'{"diseases": "', STRING, b'", "reason": "', STRING, b'"}']
    assert answer_grammar().splitlines()[0] == r'root ::= "{\"diseases\": \"" str ", \"reason\": \"" str "}"'


def test_the_scanner_agrees_with_xgrammar_on_every_utf8_byte_pair(constraint):
    """The closer follows each row byte by byte; on any byte pair after a clean string it allows exactly what the
    grammar allows (xgrammar refuses overlong forms and code points past U+10FFFF, not surrogates)."""
    import xgrammar as xgr

    layout = AnswerLayout()
    inside = layout.scan(layout.start(), b'{"diseases": "a')
    for lead in range(0x80, 0x100):
        for follow in range(0x100):
            data = bytes([lead, follow])
            ours = layout.scan(inside, data) is not None
            theirs = xgr.GrammarMatcher(constraint.compiled).accept_string(b'{"diseases": "a' + data)
            assert ours == theirs, data


def prefix_of(layout: AnswerLayout, state) -> bytes:
    """Bytes that bring an answer to ``state`` (strings hold one ``x`` before an unfinished escape or character)."""
    part, sub = state
    out = b"".join(b"" if p is STRING else p for p in layout.parts[:part])
    if part < layout.done:
        out += layout.parts[part][:sub] if layout.parts[part] is not STRING else b"x" + sub
    return out


def test_every_close_is_valid_and_as_short_as_the_budget_counts(constraint, tokenizer):
    """From every kind of state (literal offsets, escapes, unfinished characters of each length), the planned close
    is accepted by the grammar and ends the answer; its length is what the budget reserves."""
    import xgrammar as xgr

    closer = constraint.closer
    for state in closer.layout.representative_states():
        prefix = prefix_of(closer.layout, state)
        assert closer.layout.scan(closer.start(), prefix) == state
        matcher = xgr.GrammarMatcher(constraint.compiled)
        assert matcher.accept_string(prefix), state
        plan = closer.plan(state)
        assert all(matcher.accept_token(t) for t in plan), (state, plan)
        assert matcher.is_terminated() and closer.need(state) == len(plan)
    assert closer.need(closer.start()) == len(answer_ids(tokenizer, "", ""))  # {"diseases": "", "reason": ""}<eot>


# -- writing answers back ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [0, 1, 40])
def test_answers_the_task_writes_are_written_back_token_for_token(constraint, tokenizer, extra):
    """The official examples' answers and the hard ones, teacher-forced: no token of theirs is masked, also when the
    budget is exactly the answer's length (it ends by itself at the budget: not truncated)."""
    answers = official_answers() + HARD_ANSWERS
    wanted = [answer_ids(tokenizer, d, r) for d, r in answers]
    for ids in wanted if extra == 0 else []:  # one row at a time: each ends exactly at its own budget
        out, truncated = drive(constraint, [ids], len(ids), filler_id(tokenizer))
        assert out == [ids] and truncated == [False]
    out, truncated = drive(constraint, wanted, max(map(len, wanted)) + extra, filler_id(tokenizer))  # one batch
    assert out == wanted and truncated == [False] * len(wanted)
    for (diseases, reason), ids in zip(answers, out):
        assert json.loads(text_of(tokenizer, ids)) == {"diseases": diseases, "reason": reason}


def test_a_row_that_ends_one_token_before_the_budget_is_ok(constraint, tokenizer):
    from healthai.decoding import parse_answer

    ids = answer_ids(tokenizer, *official_answers()[1])
    (out,), (truncated,) = drive(constraint, [ids], len(ids) + 1, filler_id(tokenizer))
    assert out == ids and parse_answer(text_of(tokenizer, out), truncated).status == "ok"


# -- closing at the budget --------------------------------------------------------------------------------------------


def byte_token(tokenizer, data: bytes) -> int:
    """The id of the token whose bytes are ``data`` (byte-level BPE has one for every single byte)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return tokenizer.convert_tokens_to_ids("".join(bytes_to_unicode()[b] for b in data))


CUT_STATES = {
    # name: tokens written before the budget forces the close (as text, or raw bytes for an unfinished character)
    "mid-diseases": ['{"diseases": "高血压'],
    "after a backslash": ['{"diseases": "高血压', b"\\"],
    "inside a \\u escape": ['{"diseases": "a', b"\\", b"u", b"0"],
    "mid-character": ['{"diseases": "高血压', b"\xe4"],
    "mid-character of four bytes": ['{"diseases": "a', b"\xf0", b"\x9f"],
    "before the second key": ['{"diseases": "高血压", "'],
    "mid-reason": ['{"diseases": "高血压", "reason": "1. 血压高；\\n2. 头晕'],
    "after a backslash in the reason": ['{"diseases": "高血压", "reason": "1. 血压高', b"\\"],
    "mid-character in the reason": ['{"diseases": "高血压", "reason": "1. 血压高', b"\xe9", b"\xab"],
}


def tokens_of(tokenizer, pieces) -> list[int]:
    ids = []
    for piece in pieces:
        if isinstance(piece, bytes):
            ids.append(byte_token(tokenizer, piece))
        else:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return ids


@pytest.mark.parametrize("device_kernel", [None, True], ids=["cpu-masking", "xgrammar-kernel"])
@pytest.mark.parametrize("name", list(CUT_STATES))
def test_the_budget_closes_a_row_at_every_kind_of_state(constraint, tokenizer, name, device_kernel):
    """A model that would go on writing is closed the moment the budget left equals the close from where it stands:
    the answer parses strictly, it is ``truncated``, and it takes exactly the budget. (The xgrammar-kernel branch is
    the one a GPU takes, run here on the CPU: the same answers and flags.)"""
    from healthai.decoding import parse_answer

    closer = constraint.closer
    prefix = tokens_of(tokenizer, CUT_STATES[name])
    state = closer.start()
    for t in prefix:
        state = closer.advance(state, t)
    budget = len(prefix) + closer.need(state)
    (out,), (truncated,) = drive(constraint, [prefix], budget, filler_id(tokenizer), device_kernel)
    assert out[: len(prefix)] == prefix and len(out) == budget and out[-1] == EOT
    answer = parse_answer(text_of(tokenizer, out), truncated)
    assert truncated and answer.status == "truncated"
    json.loads(text_of(tokenizer, out))  # strict
    # One token more of budget: one more token of the model's own before the close.
    (longer,), (cut,) = drive(constraint, [prefix], budget + 1, filler_id(tokenizer), device_kernel)
    assert longer[: len(prefix)] == prefix and cut and len(longer) == budget + 1
    json.loads(text_of(tokenizer, longer))


def test_near_the_budget_a_token_the_close_could_not_follow_is_blocked(constraint, tokenizer):
    """With three tokens left in a clean reason (its close is ``"}`` and end-of-turn), the first byte of a four-byte
    character would need three more bytes before the close: the model may not start it, and the row is truncated."""
    prefix = tokens_of(tokenizer, ['{"diseases": "a", "reason": "b'])
    lead = byte_token(tokenizer, b"\xf0")
    (out,), (truncated,) = drive(constraint, [prefix + [lead]], len(prefix) + 3, filler_id(tokenizer))
    assert out[len(prefix)] != lead and truncated and len(out) <= len(prefix) + 3
    json.loads(text_of(tokenizer, out))


def test_a_batch_mixes_rows_that_end_by_themselves_and_rows_the_budget_closes(constraint, tokenizer):
    ok = answer_ids(tokenizer, "胃炎", "上腹痛")
    endless = tokens_of(tokenizer, ['{"diseases": "胃炎", "reason": "1. 上腹痛'])
    budget = len(ok) + 6
    outs, truncated = drive(constraint, [ok, endless, ok], budget, filler_id(tokenizer))
    assert outs[0] == ok == outs[2] and truncated == [False, True, False]
    assert len(outs[1]) == budget and json.loads(text_of(tokenizer, outs[1]))["diseases"] == "胃炎"


def test_a_processor_refuses_more_steps_than_its_budget(constraint, tokenizer):
    from healthai.decoding import JsonLogitsProcessor

    processor = JsonLogitsProcessor(constraint.compiled, constraint.closer, 12)
    ids = torch.full((1, 1), PAD)
    for _ in range(12):
        token = processor(ids, torch.zeros(1, VOCAB)).argmax(-1)
        ids = torch.cat([ids, token[:, None]], dim=1)
    assert ids[0, -1].item() == EOT
    with pytest.raises(RuntimeError, match="pass the same budget to generate and to logits_processor"):
        processor(ids, torch.zeros(1, VOCAB))


def test_the_grammar_is_compiled_once_per_tokenizer_and_again_for_a_changed_one(constraint, tokenizer, monkeypatch):
    # A validation, a predict and a serve in one process each build a JsonConstraint: the ~2 s compile is done once
    # per tokenizer object (healthai.decoding._COMPILED), each constraint keeping its own mask index.
    import gc

    from healthai import decoding

    compiles = []
    monkeypatch.setattr(decoding, "_compile", lambda *args: compiles.append(args) or (object(), object()))
    again = decoding.JsonConstraint(tokenizer, VOCAB, EOT)  # the fixture's tokenizer: compiled by the fixture
    assert compiles == [] and again.compiled is constraint.compiled and again.closer is constraint.closer
    assert again.mask_index is not constraint.mask_index

    class Grown:  # a tokenizer that gains a token (add_tokens): the same object, another vocabulary
        size = 10

        def __len__(self):
            return self.size

    other = Grown()
    first, same = decoding.JsonConstraint(other, VOCAB, EOT), decoding.JsonConstraint(other, VOCAB, EOT)
    other.size += 1
    grown = decoding.JsonConstraint(other, VOCAB, EOT)
    assert len(compiles) == 2 and same.compiled is first.compiled and grown.compiled is not first.compiled
    del other
    compiles.clear()  # held the arguments, the tokenizer among them
    gc.collect()
    assert tokenizer in decoding._COMPILED  # a tokenizer gone takes its compiled grammars with it:
    assert not [t for t in decoding._COMPILED if isinstance(t, Grown)]
