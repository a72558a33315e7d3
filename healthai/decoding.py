"""JSON-constrained generation and the one function that parses a model's answer.

Constraint: xgrammar (vLLM's default structured-output engine) compiles the answer's grammar
(:func:`healthai.answer_grammar.answer_grammar`: exactly what ``json.dumps`` writes, escapes included, strings
unbounded) against the tokenizer once; a fresh logits processor per ``generate`` call masks every token that would
break it, and closes each answer within the token budget (:class:`healthai.answer_grammar.BudgetCloser`), so every
answer is valid JSON however the model writes.

Parsing: strict ``json.loads``, else json-repair, else failure → ``parse_status`` ``ok`` | ``repaired`` | ``failed``;
``truncated`` when the processor reports that the budget, not the model, ended the answer.
"""

from __future__ import annotations

import json
import re
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal, Optional

from healthai.prompts import ANSWER_JSON_SCHEMA, join_diseases

ParseStatus = Literal["ok", "repaired", "truncated", "failed"]

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
# A Markdown fence, with or without a language tag; the closing fence may be missing when the reply was cut off.
_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\r?\n?(.*?)(?:```|\Z)", re.DOTALL)

REASON_SEPARATOR = "\n"
"""Joins a list-valued ``reason`` (one finding per line)."""


@dataclass
class ParsedAnswer:
    """A model's answer, parsed. ``diseases``/``reason`` are ``None`` when ``status`` is ``failed``.

    ``status``: ``ok`` (strict JSON), ``repaired`` (json-repair was needed: unconstrained decoding cut by the
    budget, or a reply that was not strict JSON — also when the budget closed it), ``truncated`` (strict JSON, but the
    token budget closed it rather than the model: the open string was ended where it stood, so diagnoses or findings
    may be missing), ``failed`` (no answer could be read).
    """

    diseases: Optional[str]
    reason: Optional[str]
    status: ParseStatus
    error: Optional[str] = None
    raw: Optional[str] = None
    """The text that was parsed, kept for ``failed`` rows."""
    prompt_tokens: Optional[int] = None
    """Tokens of the prompt it answered (set by generation; serve's ``usage``)."""
    completion_tokens: Optional[int] = None
    """Tokens generated for it, the end-of-turn token included (set by generation)."""

    def row_fields(self) -> dict[str, str]:
        """The answer's fields of a prediction row (predict's file and serve's ``/predict``): empty strings where
        parsing failed, and then the raw output too, so a failure can be read."""
        fields = {"reason": self.reason or "", "diseases": self.diseases or "", "parse_status": self.status}
        if self.status == "failed":
            fields["raw_output"] = self.raw or ""
        return fields


def strip_code_fence(text: str) -> str:
    """The JSON-bearing part of a reply: reasoning blocks (``<think>…</think>``) dropped, a Markdown fence unwrapped."""
    text = _THINK.sub("", text)
    if "<think>" in text:  # an unclosed reasoning block: everything after it is thinking, not the answer
        text = text.split("<think>", 1)[0]
    text = text.strip()
    if text.startswith("{"):  # already bare JSON; do not go looking for backticks inside its strings
        return text
    match = _FENCE.search(text)
    return match.group(1).strip() if match else text


def _field_text(value: Any, key: str) -> str:
    """A field as a string; a list of items is joined (diseases with ``；``, reasons one per line)."""
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        items = [str(v).strip() for v in value if str(v).strip()]
        value = join_diseases(items) if key == "diseases" else REASON_SEPARATOR.join(items)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is a {type(value).__name__}, not a string")
    return value


def answer_fields(obj: Any) -> tuple[str, str]:
    """``(diseases, reason)`` out of a parsed answer object, or ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object (got {type(obj).__name__})")
    missing = [k for k in ANSWER_JSON_SCHEMA["required"] if k not in obj]
    if missing:
        raise ValueError(f"lacks field(s) {missing}")
    return _field_text(obj["diseases"], "diseases"), _field_text(obj["reason"], "reason")


def load_answer_json(text: str, allow_repair: bool = True) -> tuple[Any, bool]:
    """``(object, repaired)`` from answer text: fences stripped, strict JSON, else (if allowed) json-repair.

    Raises ValueError when nothing JSON-like can be read.
    """
    import json_repair

    body = strip_code_fence(text)
    if not body:
        raise ValueError("no answer text")
    try:
        # strict=False admits raw control characters (a tab) inside strings: unambiguous, so nothing is repaired.
        return json.loads(body, strict=False), False
    except json.JSONDecodeError as e:
        if not allow_repair:
            raise ValueError(f"not valid JSON ({e.msg}, column {e.colno})") from None
    repaired = json_repair.loads(body)
    if isinstance(repaired, str):  # json-repair's answer for text holding no JSON at all
        raise ValueError("holds no JSON object")
    return repaired, True


def parse_answer(text: str, truncated: bool = False) -> ParsedAnswer:
    """Parse a model's answer: strict JSON (code fences allowed), else json-repair, else ``failed``.

    ``truncated``: the constrained decoder reports that the token budget closed this answer
    (:meth:`JsonLogitsProcessor.truncated`); the text is then valid JSON that the model did not finish, and its status
    is ``truncated``. Never guessed from a length: an answer that ends by itself at the budget is ``ok``.

    Whether the text needed repair is decided first: ``repaired`` wins over ``truncated``, so that ``ok`` and
    ``truncated`` both mean strict JSON (what ``json_valid`` and serve's chat content promise). A constrained answer
    never needs repair; one that does (text changed after decoding) is then seen as ``repaired``, not hidden among
    the answers the budget closed.
    """
    try:
        obj, repaired = load_answer_json(text)
        diseases, reason = answer_fields(obj)
    except (ValueError, TypeError, RecursionError) as e:
        return ParsedAnswer(None, None, status="failed", error=str(e), raw=text)
    if repaired:
        error = "not strict JSON (read by json-repair), and the token budget closed it" if truncated else None
        return ParsedAnswer(diseases, reason, status="repaired", error=error, raw=text)
    if truncated:
        return ParsedAnswer(diseases, reason, status="truncated", error="the token budget closed the answer", raw=text)
    return ParsedAnswer(diseases, reason, status="ok", raw=text)


def _compile(tokenizer, vocab_size: int, stop_token_id: int):
    """The answer grammar compiled for ``tokenizer`` and its :class:`~healthai.answer_grammar.BudgetCloser`."""
    import xgrammar as xgr

    from healthai.answer_grammar import BudgetCloser, answer_grammar

    # vocab_size is the model's (Qwen2.5-7B pads its embedding to 152,064 > the tokenizer's 151,665).
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[stop_token_id])
    compiled = xgr.GrammarCompiler(info).compile_grammar(answer_grammar())
    return compiled, BudgetCloser(info.decoded_vocab, info.special_token_ids, stop_token_id)


_COMPILED: "weakref.WeakKeyDictionary[Any, dict[tuple[int, int, int], tuple[Any, Any]]]" = weakref.WeakKeyDictionary()
""":func:`_compile`'s results by tokenizer object (gone with it) and (vocab size, stop id, tokenizer length)."""


class JsonConstraint:
    """The answer grammar compiled for one tokenizer, and its :class:`~healthai.answer_grammar.BudgetCloser`; hands
    out a fresh logits processor per ``generate`` call."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_id: int):
        # Compiled once per tokenizer object in a process (~2 s, most of it reading the 152k-token vocabulary): a
        # validation, a predict and a serve in one process, or a module rebuilt, reuse it. The compiled grammar and
        # the closer are read-only (the closer's caches are of pure functions); the mask index is per constraint.
        key = (vocab_size, stop_token_id, len(tokenizer))  # len: tokens added to the same object since
        per_tokenizer = _COMPILED.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = _compile(tokenizer, vocab_size, stop_token_id)
        self.compiled, self.closer = per_tokenizer[key]
        self.mask_index = MaskIndex(vocab_size)

    def logits_processor(self, budget: int) -> "JsonLogitsProcessor":
        """A new processor for one ``generate`` call with ``max_new_tokens=budget`` (it holds per-row matcher
        state); they share this constraint's :class:`MaskIndex` and closer, as the same rows and states come back in
        every call."""
        return JsonLogitsProcessor(self.compiled, self.closer, budget, mask_index=self.mask_index)


class JsonLogitsProcessor:
    """Masks, at every ``generate`` step, the tokens that would break the answer grammar or the budget: the whole
    batch at once.

    Per step: the rows' last tokens come to the host in ONE transfer (``tolist``; xgrammar's ``contrib.hf`` processor
    calls ``.item()`` per row — on a GPU a device sync per row per token), the live rows' matchers accept them in one
    call, their bitmasks are filled in one call (``BatchGrammarMatcher``, on xgrammar's threads) and applied to the
    logits in one call. Rows whose answer is finished (the matcher accepted the stop token) are skipped from then on.
    The bitmask buffers are allocated on the first step (batch size and device are known then) and reused.

    The budget (``max_new_tokens`` of the same call, counted here by steps): each row's bitmask is narrowed by
    :meth:`BudgetCloser.decide <healthai.answer_grammar.BudgetCloser.decide>` — near the end of the budget to the
    tokens after which the answer can still close, at the end to the close itself. Where that changed the token the
    model would have picked under the grammar alone (the highest score), the row is truncated
    (:meth:`truncated`): the budget, not the model, ended it. On a GPU that comparison stays on the device (read
    once, after ``generate``), so a step keeps its one device-to-host transfer.

    Applying on a GPU is ``xgrammar.apply_token_bitmask_inplace`` (its Triton kernel), on the whole batch. On the CPU
    that function's kernel reads all 152k bits of every row at every step (~0.15 ms a row in an open string, ~0.7 ms
    one the grammar forces), so :func:`apply_bitmask_cpu` masks by token ids looked up per distinct row instead
    (``device_kernel`` true takes the GPU branch on any device, for tests).

    Forced stretches still cost one forward per token: feeding them in the prompt instead would change the token
    boundaries the model was trained on (a free model may start ``{"`` or ``{``), so answers would differ.

    Usable as an element of ``generate``'s ``logits_processor`` list (a callable ``(input_ids, scores) -> scores``).
    ``steps`` and ``seconds`` count the calls and the host time spent in them (on a GPU the mask kernel runs
    asynchronously after).
    """

    def __init__(self, compiled, closer, budget: int, threads: int | str = "auto",
                 mask_index: Optional[MaskIndex] = None, device_kernel: Optional[bool] = None):  # fmt: skip
        import xgrammar as xgr

        self.compiled = compiled
        self.closer = closer
        self.budget = budget
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.mask_index = mask_index if mask_index is not None else MaskIndex(self.vocab_size)
        self.device_kernel = device_kernel
        # "auto": half the hardware threads, as xgrammar chooses (one thread on a 2-core machine).
        self.batcher = xgr.BatchGrammarMatcher(threads)
        self.matchers: list[Any] = []
        self.states: list[Any] = []
        """Each row's place in the answer (:class:`~healthai.answer_grammar.AnswerLayout` state)."""
        self.live: list[int] = []
        """Rows still writing their answer."""
        self.host_mask = self.device_mask = None
        self.budget_mask = self.device_budget = None
        self.narrowed: list[int] = []
        self.overrode = None
        self.steps = 0
        self.seconds = 0.0

    def _start(self, batch_size: int, device) -> None:
        import torch
        import xgrammar as xgr

        self.matchers = [xgr.GrammarMatcher(self.compiled) for _ in range(batch_size)]
        self.states = [self.closer.start() for _ in range(batch_size)]
        self.live = list(range(batch_size))
        shape = xgr.get_bitmask_shape(batch_size, self.vocab_size)
        kernel = device.type == "cuda" if self.device_kernel is None else self.device_kernel
        pin = device.type == "cuda"
        # xgrammar fills host memory; pinned, it reaches the GPU in an asynchronous copy.
        self.host_mask = torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)
        self.device_mask = torch.full(shape, -1, dtype=torch.int32, device=device) if kernel else self.host_mask
        # The budget's narrowing, applied after the grammar's mask (all-allowed rows where it has nothing to say): in
        # between, each narrowed row's best token under the grammar alone is read, and the row is truncated when the
        # budget does not allow it (what the model would have picked is not what it may pick).
        self.budget_mask = torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)
        if kernel:
            self.device_budget = torch.full(shape, -1, dtype=torch.int32, device=device)
        self.overrode = torch.zeros(batch_size, dtype=torch.bool, device=device)

    def __call__(self, input_ids, scores):
        # The step's one device-to-host transfer. It waits for the step's forward, as generate's own check for
        # finished rows does at every step anyway, so that wait is not counted in ``seconds``.
        last = input_ids[:, -1].tolist() if self.matchers else None
        start = time.perf_counter()
        if self.steps >= self.budget:
            raise RuntimeError(f"JSON constraint: step {self.steps + 1} of a processor made for max_new_tokens "
                               f"{self.budget}: pass the same budget to generate and to logits_processor()")
        if last is None:  # the first step: nothing generated yet
            self._start(input_ids.shape[0], scores.device)
        else:
            self._accept(last)
        if self.live:
            self._mask(scores)
        self.steps += 1
        self.seconds += time.perf_counter() - start
        return scores

    def truncated(self) -> list[bool]:
        """Per row of the ``generate`` call: whether the budget ended its answer (changed a token the model would
        have picked under the grammar alone). One device-to-host transfer, after ``generate``."""
        return self.overrode.tolist() if self.overrode is not None else []

    def _accept(self, last: list[int]) -> None:
        """Advance the live rows' matchers by the tokens just generated; retire the rows that finished."""
        import xgrammar as xgr

        matchers = [self.matchers[i] for i in self.live]
        accepted = xgr.BatchGrammarMatcher.batch_accept_token(matchers, [last[i] for i in self.live])
        if not all(accepted):  # cannot happen when this mask was applied: a bug, not a bad input
            bad = [(i, last[i]) for i, ok in zip(self.live, accepted) if not ok]
            raise RuntimeError(f"JSON constraint: (row, token) {bad} rejected by the answer grammar")
        for i in self.live:
            self.states[i] = self.closer.advance(self.states[i], last[i])
            if self.states[i] is None:  # the grammar and the closer's scanner disagree: a bug
                raise RuntimeError(f"answer budget: row {i}'s token {last[i]} is not in the answer's layout")
        finished = [i for i, m in zip(self.live, matchers) if m.is_terminated()]
        if finished:
            # generate pads a finished row whatever its scores; an all-allowed row keeps them finite.
            self.host_mask[finished] = -1
            done = set(finished)
            self.live = [i for i in self.live if i not in done]

    def _mask(self, scores) -> None:
        import xgrammar as xgr

        matchers = [self.matchers[i] for i in self.live]
        self.batcher.batch_fill_next_token_bitmask(matchers, self.host_mask, indices=self.live)
        narrowed = self._narrow()
        if self.device_mask is self.host_mask:
            apply_bitmask_cpu(scores, self.host_mask, self.live, self.vocab_size, self.mask_index)
            if narrowed:
                self._apply_budget_cpu(scores, narrowed)
            return
        # One copy and one kernel for the whole batch (finished rows' masks are all-allowed: harmless).
        self.device_mask.copy_(self.host_mask, non_blocking=True)
        xgr.apply_token_bitmask_inplace(scores, self.device_mask, vocab_size=self.vocab_size)
        if narrowed:  # the last steps of a row only; all on the device, nothing read back
            self.device_budget.copy_(self.budget_mask, non_blocking=True)
            self.overrode |= ~_bit_set(self.device_budget, scores.argmax(-1))
            xgr.apply_token_bitmask_inplace(scores, self.device_budget, vocab_size=self.vocab_size)

    def _narrow(self) -> list[int]:
        """Fill ``budget_mask`` with the tokens the budget allows each live row (``steps`` tokens written, so
        ``budget - steps`` left, this one included); returns the rows it narrows (the others' rows are all-allowed)."""
        left = self.budget - self.steps
        words = self.budget_mask.numpy()
        if self.narrowed:
            words[self.narrowed] = -1
        self.narrowed = []
        for i in self.live:
            allowed = self.closer.decide(self.states[i], left)
            if allowed is not None:
                words[i] = allowed
                self.narrowed.append(i)
        return self.narrowed

    def _apply_budget_cpu(self, scores, rows: list[int]) -> None:
        """The budget's narrowing of ``rows`` after the grammar's mask, noting the rows whose best token it blocks."""
        import numpy as np
        import torch

        # numpy's argmax, row by row on a view: ~10x faster than torch's on the CPU, and no copy of the rows.
        values = scores.detach().numpy()
        best = np.array([values[r, : self.vocab_size].argmax() for r in rows])
        words = self.budget_mask.numpy()[rows]
        kept = (words[np.arange(len(rows)), best // 32] >> (best % 32)) & 1
        self.overrode[rows] |= torch.from_numpy(kept == 0)
        apply_bitmask_cpu(scores, self.budget_mask, rows, self.vocab_size, self.mask_index)


def _bit_set(words, tokens):
    """Per row, whether token ``tokens[row]`` is allowed by the bitmask row ``words[row]`` (xgrammar's layout), on
    the tensors' device."""
    word = words.gather(1, (tokens // 32)[:, None])[:, 0]
    return ((word >> (tokens % 32)) & 1).bool()


class MaskIndex:
    """How to mask each distinct bitmask row, worked out once per row content and reused.

    A schema's bitmask rows repeat: every step inside an open string allows the same characters (until the budget comes
    near), and every forced stretch (``{"diseases": "``) allows the same single token at each of its positions,
    in every row and every ``generate`` call. So instead of reading the 152k bits at every step, each row's words are
    looked up (hashing its 19 KB: ~7 µs) and the way found the first time is used again: the blocked ids of a row that
    allows most tokens (``index_fill_`` with ``-inf``), the allowed ids of a row that blocks most (kept, the rest
    filled), or, where either list is long (inside the answer's strings, rows allowing or blocking 37-75k of the 152k
    tokens are common, and ``index_fill_`` costs ~2.5 ns an id), an additive row of ``0`` / ``-inf`` (one vectorised add, ~27 µs; a score of
    ``+inf`` would become NaN, which logits never are). Bounded: emptied when it would hold more than ``max_ids`` ids
    or ``max_dense`` additive rows (decoding 12 real records met 74 distinct rows, 22 of them additive).
    """

    DENSE_FROM = 8192
    """Ids from which an additive row is cheaper than ``index_fill_`` (measured on one core)."""

    def __init__(self, vocab_size: int, max_ids: int = 1 << 22, max_dense: int = 64):
        self.vocab_size = vocab_size
        self.max_ids, self.max_dense = max_ids, max_dense
        self.entries: dict[bytes, tuple[str, Any]] = {}
        self.ids = self.dense = 0

    def lookup(self, words) -> tuple[str, Any]:
        """``(how, tensor)`` for one row's bitmask words (an int32 numpy array): ``"block"`` and the blocked ids,
        ``"keep"`` and the allowed ids (every other score goes to ``-inf``), or ``"add"`` and a float row to add."""
        key = words.tobytes()
        entry = self.entries.get(key)
        if entry is None:
            entry = self._entry(words)
            dense = entry[0] == "add"
            if self.ids + (0 if dense else len(entry[1])) > self.max_ids or self.dense + dense > self.max_dense:
                self.entries.clear()
                self.ids = self.dense = 0
            self.entries[key] = entry
            self.ids += 0 if dense else len(entry[1])
            self.dense += dense
        return entry

    def _entry(self, words) -> tuple[str, Any]:
        import numpy as np
        import torch

        # xgrammar's layout: token t is bit t % 32 of word t // 32 (little-endian int32 words).
        allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)
        keep = int(allowed.sum()) * 2 <= self.vocab_size
        ids = np.flatnonzero(allowed if keep else ~allowed)
        if len(ids) < self.DENSE_FROM:
            return ("keep" if keep else "block"), torch.from_numpy(ids)
        add = np.zeros(self.vocab_size, dtype=np.float32)
        add[~allowed] = float("-inf")
        return "add", torch.from_numpy(add)


def apply_bitmask_cpu(scores, bitmask, rows: list[int], vocab_size: int, index: Optional[MaskIndex] = None) -> None:
    """Set to ``-inf`` the scores of the tokens ``bitmask`` blocks (bit 0), in the given rows, on the CPU.

    xgrammar's CPU kernel reads every bit and writes each blocked token on its own: ~0.15 ms for a row in an open
    string, ~0.7 ms for a row that blocks nearly all 152k, as the stretches the schema forces do (``{"diseases": "``,
    ``", "reason": "``) — at batch 1 a tenth of the small model's whole step. Here each row's way comes from ``index``
    (:class:`MaskIndex`, kept across steps and ``generate`` calls; a fresh one if none is given): one ``index_fill_``
    of the blocked ids of every row that allows most tokens, a memset per row and one put-back of the few allowed
    scores of the rows that block most, and one add per row with long lists. Scores that are not contiguous or not
    float32 (never so in ``generate``, which masks float32 copies) go through xgrammar's kernel.
    """
    import torch
    import xgrammar as xgr

    if not scores.is_contiguous() or scores.dtype != torch.float32:
        xgr.apply_token_bitmask_inplace(scores, bitmask, vocab_size=vocab_size, indices=rows)
        return
    index = index if index is not None else MaskIndex(vocab_size)
    words = bitmask.numpy()
    width = scores.shape[1]
    blocked, kept, kept_rows = [], [], []
    for r in rows:
        how, values = index.lookup(words[r])
        if how == "add":
            scores[r, :vocab_size].add_(values)
            continue
        # Flat positions in the scores: 1-D index_fill_ / index_select / index_copy_ are ~3x faster than [row, ids].
        flat = values + r * width if r else values
        if how == "keep":
            kept.append(flat)
            kept_rows.append(r)
        elif len(values):
            blocked.append(flat)
    scores_1d = scores.view(-1)
    if blocked:
        scores_1d.index_fill_(0, blocked[0] if len(blocked) == 1 else torch.cat(blocked), float("-inf"))
    if kept_rows:
        at = kept[0] if len(kept) == 1 else torch.cat(kept)
        values = scores_1d.index_select(0, at)
        for r in kept_rows:  # a memset per row (index_fill_ over the rows is ~5x slower)
            scores[r, :vocab_size].fill_(float("-inf"))
        scores_1d.index_copy_(0, at, values)


