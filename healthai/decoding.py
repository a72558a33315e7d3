"""JSON-constrained generation and the one function that parses a model's answer.

Constraint: xgrammar (vLLM's default structured-output engine) compiles the answer's JSON schema against the
tokenizer once; a fresh logits processor per ``generate`` call masks every token that would break the schema. The
format is pinned to ``json.dumps``'s separators — exactly what the model was trained to write — and each string gets a
``maxLength`` so that a budget of new tokens can close the object.

Parsing: strict ``json.loads``, else json-repair, else failure → ``parse_status`` ``ok`` | ``repaired`` | ``failed``;
an answer with a field at its ``maxLength`` is ``truncated`` (the constraint closed that string, not the model).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

from healthai.errors import ConfigError, PositiveInt, check_declared
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

    ``status``: ``ok`` (strict JSON), ``repaired`` (json-repair was needed: e.g. the token budget cut the answer),
    ``truncated`` (a field reached its ``maxLength`` cap, so the constraint may have cut it: diagnoses or findings
    may be missing), ``failed`` (no answer could be read).
    """

    diseases: Optional[str]
    reason: Optional[str]
    status: ParseStatus
    error: Optional[str] = None
    raw: Optional[str] = None
    """The text that was parsed, kept for ``failed`` rows."""

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


def parse_answer(text: str, max_diseases_chars: Optional[int] = None, max_reason_chars: Optional[int] = None
                 ) -> ParsedAnswer:  # fmt: skip
    """Parse a model's answer: strict JSON (code fences allowed), else json-repair, else ``failed``.

    Pass the caps the answer was generated under (``None`` = uncapped, or unconstrained decoding): a field that
    reaches its cap makes the answer ``truncated``. xgrammar closes a string at ``maxLength`` whatever the model was
    about to write, so an answer at the cap looks complete but may have lost diagnoses; one that happens to end exactly
    at the cap is marked too (it cannot be told apart).
    """
    try:
        obj, repaired = load_answer_json(text)
        diseases, reason = answer_fields(obj)
    except (ValueError, TypeError, RecursionError) as e:
        return ParsedAnswer(None, None, status="failed", error=str(e), raw=text)
    at_cap = [f"{key} reached its cap of {cap} characters"
              for key, value, cap in (("diseases", diseases, max_diseases_chars), ("reason", reason, max_reason_chars))
              if cap is not None and len(value) >= cap]  # fmt: skip
    if at_cap:
        return ParsedAnswer(diseases, reason, status="truncated", error="; ".join(at_cap), raw=text)
    return ParsedAnswer(diseases, reason, status="repaired" if repaired else "ok", raw=text)


CAPPED_UNWRITABLE = re.compile(r'["\\\x00-\x1f]')
"""Characters an answer string cannot hold under a ``maxLength`` cap. xgrammar (0.2.9) compiles a capped string to
a run of at most ``cap`` characters other than a quote, a backslash, CR and LF, with no escape sequences; the model is
trained on ``json.dumps`` text, which writes a quote, a backslash and every control character (newline, tab) as an
escape. A label holding one of them cannot be written under a cap (tests/test_truncation.py checks this against
xgrammar)."""


def answer_schema(max_diseases_chars: Optional[int], max_reason_chars: Optional[int]) -> dict[str, Any]:
    """The answer's JSON schema, with optional ``maxLength`` bounds on the two strings (see :data:`CAPPED_UNWRITABLE`
    for what a bounded string cannot hold)."""
    schema = json.loads(json.dumps(ANSWER_JSON_SCHEMA))
    for key, bound in (("diseases", max_diseases_chars), ("reason", max_reason_chars)):
        if bound is not None:
            schema["properties"][key]["maxLength"] = bound
    return schema


class JsonConstraint:
    """The answer schema compiled for one tokenizer; hands out a fresh logits processor per ``generate`` call."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        max_diseases_chars: Optional[int] = None,
        max_reason_chars: Optional[int] = None,
    ):
        import xgrammar as xgr

        # vocab_size is the model's (Qwen2.5-7B pads its embedding to 152,064 > the tokenizer's 151,665).
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        compiler = xgr.GrammarCompiler(info)
        # Compact separators identical to json.dumps' defaults: the constrained format is the trained format, and no
        # token can be spent on free whitespace.
        self.compiled = compiler.compile_json_schema(
            json.dumps(answer_schema(max_diseases_chars, max_reason_chars)), any_whitespace=False,
            separators=(", ", ": "),
        )  # fmt: skip
        self.mask_index = MaskIndex(vocab_size)

    def logits_processor(self) -> "JsonLogitsProcessor":
        """A new processor (it holds per-row matcher state, so one serves exactly one ``generate`` call); they share
        this constraint's :class:`MaskIndex`, as the same bitmask rows come back in every call."""
        return JsonLogitsProcessor(self.compiled, mask_index=self.mask_index)


class JsonLogitsProcessor:
    """Masks, at every ``generate`` step, the tokens that would break the compiled schema: the whole batch at once.

    Per step: the rows' last tokens come to the host in ONE transfer (``tolist``; xgrammar's ``contrib.hf`` processor
    calls ``.item()`` per row — on a GPU a device sync per row per token), the live rows' matchers accept them in one
    call, their bitmasks are filled in one call (``BatchGrammarMatcher``, on xgrammar's threads) and applied to the
    logits in one call. Rows whose answer is finished (the matcher accepted the stop token) are skipped from then on.
    The bitmask buffers are allocated on the first step (batch size and device are known then) and reused.

    Applying on a GPU is ``xgrammar.apply_token_bitmask_inplace`` (its Triton kernel), on the whole batch. On the CPU
    that function's kernel reads all 152k bits of every row at every step (~0.15 ms a row in an open string, ~0.7 ms
    one the schema forces), so :func:`apply_bitmask_cpu` masks by token ids looked up per distinct row instead.

    Forced stretches still cost one forward per token: feeding them in the prompt instead would change the token
    boundaries the model was trained on (a free model may start ``{"`` or ``{``), so answers would differ.

    Usable as an element of ``generate``'s ``logits_processor`` list (a callable ``(input_ids, scores) -> scores``).
    ``steps`` and ``seconds`` count the calls and the host time spent in them (on a GPU the mask kernel runs
    asynchronously after).
    """

    def __init__(self, compiled, threads: int | str = "auto", mask_index: Optional[MaskIndex] = None):
        import xgrammar as xgr

        self.compiled = compiled
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.mask_index = mask_index if mask_index is not None else MaskIndex(self.vocab_size)
        # "auto": half the hardware threads, as xgrammar chooses (one thread on a 2-core machine).
        self.batcher = xgr.BatchGrammarMatcher(threads)
        self.matchers: list[Any] = []
        self.live: list[int] = []
        """Rows still writing their answer."""
        self.host_mask = None
        self.device_mask = None
        self.steps = 0
        self.seconds = 0.0

    def _start(self, batch_size: int, device) -> None:
        import torch
        import xgrammar as xgr

        self.matchers = [xgr.GrammarMatcher(self.compiled) for _ in range(batch_size)]
        self.live = list(range(batch_size))
        shape = xgr.get_bitmask_shape(batch_size, self.vocab_size)
        cuda = device.type == "cuda"
        # xgrammar fills host memory; pinned, it reaches the GPU in an asynchronous copy.
        self.host_mask = torch.full(shape, -1, dtype=torch.int32, pin_memory=cuda)
        self.device_mask = torch.full(shape, -1, dtype=torch.int32, device=device) if cuda else self.host_mask

    def __call__(self, input_ids, scores):
        # The step's one device-to-host transfer. It waits for the step's forward, as generate's own check for
        # finished rows does at every step anyway, so that wait is not counted in ``seconds``.
        last = input_ids[:, -1].tolist() if self.matchers else None
        start = time.perf_counter()
        if last is None:  # the first step: nothing generated yet
            self._start(input_ids.shape[0], scores.device)
        else:
            self._accept(last)
        if self.live:
            self._mask(scores)
        self.steps += 1
        self.seconds += time.perf_counter() - start
        return scores

    def _accept(self, last: list[int]) -> None:
        """Advance the live rows' matchers by the tokens just generated; retire the rows that finished."""
        import xgrammar as xgr

        matchers = [self.matchers[i] for i in self.live]
        accepted = xgr.BatchGrammarMatcher.batch_accept_token(matchers, [last[i] for i in self.live])
        if not all(accepted):  # cannot happen when this mask was applied: a bug, not a bad input
            bad = [(i, last[i]) for i, ok in zip(self.live, accepted) if not ok]
            raise RuntimeError(f"JSON constraint: (row, token) {bad} rejected by the answer grammar")
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
        if self.device_mask is self.host_mask:
            apply_bitmask_cpu(scores, self.host_mask, self.live, self.vocab_size, self.mask_index)
        else:
            # One copy and one kernel for the whole batch (finished rows' masks are all-allowed: harmless).
            self.device_mask.copy_(self.host_mask, non_blocking=True)
            xgr.apply_token_bitmask_inplace(scores, self.device_mask, vocab_size=self.vocab_size)


class MaskIndex:
    """How to mask each distinct bitmask row, worked out once per row content and reused.

    A schema's bitmask rows repeat: every step inside an open string allows the same characters (until the length cap
    comes near), and every forced stretch (``{"diseases": "``) allows the same single token at each of its positions,
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


@dataclass
class GenerationSettings:
    """How answers are generated, in validation and predict alike.

    These are the only decoding settings in play: :meth:`transformers_config` turns them into a complete
    ``GenerationConfig``, so nothing is inherited from a checkpoint's ``generation_config.json`` (Qwen2.5-7B-Instruct
    ships ``do_sample``, ``temperature 0.7``, ``top_p 0.8``, ``top_k 20`` and ``repetition_penalty 1.05``).
    """

    max_new_tokens: PositiveInt = 512
    """Most tokens generated per record (the answer and its end-of-turn token)."""

    do_sample: bool = False
    """Sample instead of greedy decoding. Greedy is deterministic and batch-invariant."""

    temperature: float = 0.7
    """Sampling temperature (only with ``do_sample``)."""

    top_p: float = 0.8
    """Nucleus sampling mass (only with ``do_sample``)."""

    top_k: int = 0
    """Sample only among the k most likely tokens (only with ``do_sample``; 0 = no top-k filter)."""

    repetition_penalty: float = 1.0
    """Divide the scores of tokens already in the prompt or answer by this (1.0 = none, greedy or not). The model is
    trained without one, and a penalty discourages copying findings from the case text into ``reason``."""

    constrained: bool = True
    """Constrain decoding to the answer's JSON schema (xgrammar), so every answer parses."""

    max_diseases_chars: Optional[int] = 64
    """``maxLength`` of the ``diseases`` string under the constraint (None = unbounded)."""

    max_reason_chars: Optional[int] = 400
    """``maxLength`` of the ``reason`` string under the constraint (None = unbounded). Keep the two bounds within
    ``max_new_tokens`` so that the object always closes before the budget runs out (checked at start-up)."""

    def __post_init__(self) -> None:
        check_declared(GenerationSettings, vars(self), "generation.")  # the CLI checks these too, naming the option

    def transformers_config(self, eos_token_ids: Sequence[int], pad_token_id: int):
        """A complete ``transformers.GenerationConfig`` of these settings.

        ``generate`` fills every field of a passed config that is ``None`` from the model's own generation config
        (``GenerationMixin._prepare_generation_config``, transformers 5). Every field with a global default is
        therefore set here — to that neutral default unless these settings say otherwise — so a checkpoint's
        ``top_k`` or ``repetition_penalty`` cannot leak in. (The caller also installs this config as the model's own,
        which closes the fields that have no global default, such as ``min_p``.)
        """
        from transformers import GenerationConfig

        values = GenerationConfig._get_default_generation_params()
        values.update(
            max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, repetition_penalty=self.repetition_penalty,
            eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id, use_cache=True,
        )  # fmt: skip
        # max_new_tokens bounds the length; a max_length left at its default 20 is then ignored (set, it would
        # only draw a "both set" warning from generate).
        values["max_length"] = None
        if self.do_sample:  # greedy keeps the neutral values: no "flag only used when sampling" warnings
            values.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return GenerationConfig(**values)

    def serving_config(self, eos_token_ids: Sequence[int], pad_token_id: int, bos_token_id: Optional[int]) -> dict:
        """The ``generation_config.json`` of an exported model: vLLM and ``generate`` decode as predict does.

        vLLM takes its default sampling parameters from this file (``repetition_penalty``, ``temperature``,
        ``top_k``, ``top_p``, ``min_p``, ``max_new_tokens``) and ignores ``do_sample``: greedy is ``temperature 0``
        there, and a file that leaves the temperature out samples at 1.0. transformers ignores the sampling fields
        when ``do_sample`` is false. ``top_k`` 0 (off) is written only when sampling: it is what transformers reads as
        "no filter" (vLLM before 0.9 rejects 0; it is absent, hence off, in a greedy file). The JSON constraint is not
        a file setting: a server applies it per request (``response_format`` with the answer schema).
        """
        config: dict[str, Any] = {"bos_token_id": bos_token_id, "eos_token_id": list(eos_token_ids),
                                  "pad_token_id": pad_token_id, "do_sample": self.do_sample,
                                  "max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}  # fmt: skip
        if self.do_sample:
            config.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            config.update(temperature=0.0, top_p=1.0)
        return {k: v for k, v in config.items() if v is not None}


# Characters an answer is written in: ASCII, full-width punctuation, a newline, common and rare (Extension A / late
# BMP) CJK ideographs. Each is measured in a run of its own kind, inside the answer's JSON string.
_BUDGET_PROBE = ("A", "1", "；", "、", "（", "\n", "病", "\u3400", "\u4db5", "\u9fa5", "\u9fd5")


def worst_tokens_per_char(tokenizer) -> int:
    """The most tokens this tokenizer spends per character of an answer string, over :data:`_BUDGET_PROBE`.

    Qwen2.5's byte-level BPE: 1 for ASCII and common Chinese, 2 for rare ideographs whose three UTF-8 bytes have no
    merged token.
    """
    from healthai.prompts import answer_text

    def n(text: str) -> int:
        return len(tokenizer.encode(answer_text("", text), add_special_tokens=False))

    empty, run = n(""), 16
    return max(math.ceil((n(ch * run) - empty) / run) for ch in _BUDGET_PROBE)


def check_answer_budget(tokenizer, settings: GenerationSettings) -> Optional[str]:
    """Does an answer at the schema's length caps fit in ``max_new_tokens``? ``None`` if it does, else a warning.

    Needed: the JSON scaffolding (``{"diseases": "", "reason": ""}``) and the end-of-turn token, plus the caps'
    characters at :func:`worst_tokens_per_char`. An answer that runs out of tokens is cut and comes back
    ``repaired`` with a truncated reason. Raises ValueError when not even the scaffolding fits (no answer could
    ever close).
    """
    from healthai.prompts import answer_text

    if not settings.constrained:
        return None
    scaffold = len(tokenizer.encode(answer_text("", ""), add_special_tokens=False)) + 1
    budget = settings.max_new_tokens
    if budget < scaffold:
        raise ConfigError(f"generation.max_new_tokens={budget} is below the {scaffold} tokens of an empty answer "
                         f"object: no answer can be complete; raise it")  # fmt: skip
    caps = (settings.max_diseases_chars, settings.max_reason_chars)
    if None in caps:
        return (f"generation.max_diseases_chars/max_reason_chars unbounded: an answer longer than "
                f"max_new_tokens={budget} is cut (parse_status 'repaired'); set both caps")  # fmt: skip
    per_char = worst_tokens_per_char(tokenizer)
    needed = scaffold + per_char * sum(caps)
    if needed <= budget:
        return None
    return (f"generation.max_new_tokens={budget} may cut answers at the caps: max_diseases_chars + max_reason_chars = "
            f"{sum(caps)} characters at up to {per_char} token(s) each plus {scaffold} for the JSON scaffolding need "
            f"{needed}; raise max_new_tokens to {needed} or lower the caps (cut answers are parsed as 'repaired')")
