"""The answer's grammar, and how an answer is closed within its token budget.

**The grammar** is the answer exactly as the model is trained to write it: ``json.dumps({"diseases": d, "reason": r},
ensure_ascii=False)`` (:func:`healthai.prompts.answer_text`), so any answer ``json.dumps`` can write is one the
constrained decoder can write — newlines, tabs, quotes and backslashes as ``\\n``, ``\\t``, ``\\"``, ``\\\\``, other
control characters as ``\\u00XX``, every other character as itself, strings as long as the budget allows — and
nothing else (no ``\\/``, no ``\\u4e2d``: those are not what ``json.dumps`` writes, and a ``\\ud800`` would decode to
a lone surrogate no UTF-8 file can hold). It is written in xgrammar's EBNF rather than compiled from the JSON schema
because a schema string with ``maxLength`` compiles to a character class without an escape branch (xgrammar issue
#800), and unbounded strings need no bound here: the budget closes the answer instead.

**The budget close.** The strings are unbounded, so a grammar alone cannot promise that the object closes within
``max_new_tokens``. :class:`BudgetCloser` can: it follows each row's answer byte by byte (:class:`AnswerLayout`'s
scanner: which part of the object it is in, and inside a string whether it is clean, after a backslash, inside a
``\\u00XX`` escape or inside a multi-byte character), knows for every such state the fewest tokens that close the
object from there (:meth:`BudgetCloser.need`: the shortest valid completion, tokenised in as few tokens as the
vocabulary allows, plus the end-of-turn token), and at each step, with ``r`` tokens left:

- in the last few steps, allows only the tokens after which the close still fits in what is left (a token ending in
  a backslash or half a character needs more tokens to close than one that does not);
- so once ``need == r`` only closing tokens remain: the close is forced from wherever the row stands (inside a
  string, just after a backslash, in the middle of a character), yet the model may still close its own way if it
  takes no more tokens;
- otherwise leaves the model alone: an answer that ends by itself within the budget is never touched.

Nothing here imports torch or xgrammar: the processor in :mod:`healthai.decoding` applies these decisions.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from functools import cached_property
from typing import Optional, Sequence

from healthai.prompts import ANSWER_KEYS

QUOTE, BACKSLASH = 0x22, 0x5C
SHORT_ESCAPES = frozenset(b'"\\bfnrt')
"""What follows a backslash in ``json.dumps`` output, besides ``u``."""
UNICODE_ESCAPE = (b"0", b"0", b"01", b"0123456789abcdef")
"""The four hex digits ``json.dumps`` writes after ``\\u``: only ``\\u0000``–``\\u001f`` (the other control
characters), lowercase."""

STRING = None
"""A string field's place in :attr:`AnswerLayout.parts` (the literal parts are bytes)."""

State = tuple
"""``(part, sub)``: ``part`` indexes :attr:`AnswerLayout.parts` (``len(parts)``: the object is complete); in a
literal ``sub`` is the offset of the next byte, in a string the bytes of an unfinished escape (``b"\\\\"``,
``b"\\\\u00"``) or character (a UTF-8 lead byte and the continuation bytes so far), ``b""`` when clean."""


def answer_grammar(keys: Sequence[str] = ANSWER_KEYS) -> str:
    """xgrammar EBNF of ``json.dumps(dict(zip(keys, strings)), ensure_ascii=False)``.

    The string rule is recursive with a look-ahead for what follows a closing quote, the shape xgrammar's own JSON
    strings take: a repetition (``char*``) of the same alternatives costs ~0.1 s per token mask on Qwen's vocabulary,
    this ~30 µs.
    """
    parts = [p for p in AnswerLayout(keys).parts if p is not STRING]
    # Each string rule consumes its closing quote, so the literal after it starts one byte later; what that literal
    # goes on with is the look-ahead.
    body = [json.dumps(parts[0].decode())] + [f"str {json.dumps(p[1:].decode())}" for p in parts[1:]]
    after = "".join(sorted({chr(p[1]) for p in parts[1:]}))
    return "\n".join([
        f"root ::= {' '.join(body)}",
        r'str ::= ("\"" | [^\0-\x1f\"\\] str | "\\" escape str) (=[' + after + "])",
        r'escape ::= [\"\\bfnrt] | "u00" [01] [0-9a-f]',
    ])  # fmt: skip


class AnswerLayout:
    """The answer object as literal byte runs and string fields, and a byte-level scanner over it."""

    def __init__(self, keys: Sequence[str] = ANSWER_KEYS):
        # json.dumps with a marker in each string, split at the markers: the literals are exactly json.dumps's.
        marker = "\x00"
        text = json.dumps({k: marker for k in keys}, ensure_ascii=False).replace("\\u0000", marker)
        pieces = [p.encode() for p in text.split(marker)]
        self.parts: list[Optional[bytes]] = []
        for i, piece in enumerate(pieces):
            # The closing quote of a string belongs to the literal after it (the scanner's clean string state ends
            # at an unescaped quote).
            self.parts += [piece] if i == 0 else [STRING, piece]
        self.done = len(self.parts)

    def start(self, part: int = 0) -> State:
        """The state at the beginning of ``part``."""
        if part >= self.done:
            return (self.done, None)
        return (part, b"" if self.parts[part] is STRING else 0)

    def step(self, state: State, byte: int) -> Optional[State]:
        """The state after one more byte, or None if the grammar does not allow it."""
        part, sub = state
        if part >= self.done:
            return None
        literal = self.parts[part]
        if literal is not STRING:
            if byte != literal[sub]:
                return None
            return self.start(part + 1) if sub + 1 == len(literal) else (part, sub + 1)
        if not sub:
            if byte == QUOTE:
                return self.step(self.start(part + 1), byte)
            if byte == BACKSLASH:
                return (part, b"\\")
            if byte < 0x20:
                return None
            if byte < 0x80:
                return state
            return (part, bytes([byte])) if 0xC2 <= byte <= 0xF4 else None
        if sub[0] == BACKSLASH:
            if len(sub) == 1:
                if byte in SHORT_ESCAPES:
                    return (part, b"")
                return (part, b"\\u") if byte == ord("u") else None
            written = len(sub) - 2
            if byte not in UNICODE_ESCAPE[written]:
                return None
            return (part, b"") if written == 3 else (part, sub + bytes([byte]))
        low, high = continuation_range(sub)
        if not low <= byte <= high:
            return None
        full = sub + bytes([byte])
        return (part, b"") if len(full) == utf8_length(sub[0]) else (part, full)

    def scan(self, state: Optional[State], data: bytes) -> Optional[State]:
        """The state after ``data`` (None once a byte is not allowed)."""
        for byte in data:
            if state is None:
                return None
            state = self.step(state, byte)
        return state

    def closes(self, state: State) -> list[bytes]:
        """Byte strings that close the object from ``state`` with every open string left as short as it can be (an
        escape or character finished in the cheapest way, then the remaining literals). Several when a choice
        exists (which escape letter): :class:`BudgetCloser` keeps the one that takes the fewest tokens."""
        part, sub = state
        if part >= self.done:
            return [b""]
        tail = b"".join(p for p in self.parts[part + 1 :] if p is not STRING)
        literal = self.parts[part]
        if literal is not STRING:
            return [literal[sub:] + tail]
        if not sub:
            return [tail]
        if sub == b"\\":
            return [bytes([c]) + tail for c in sorted(SHORT_ESCAPES)]
        if sub[0] == BACKSLASH:
            rest = bytes(UNICODE_ESCAPE[i][0] for i in range(len(sub) - 2, 4))
            return [rest + tail]
        low, _ = continuation_range(sub)
        missing = utf8_length(sub[0]) - len(sub)
        return [bytes([low]) + b"\x80" * (missing - 1) + tail]

    def representative_states(self) -> list[State]:
        """One state of every kind that needs its own close (every literal offset, every escape prefix, every
        kind of unfinished character), for bounds over all states."""
        states = []
        for part, literal in enumerate(self.parts):
            if literal is not STRING:
                # A literal after a string starts past its first byte: the quote that closes the string.
                states += [(part, k) for k in range(1 if part else 0, len(literal))]
                continue
            subs = [b"", b"\\", b"\\u", b"\\u0", b"\\u00", b"\\u000", b"\\u001"]
            for lead in (0xC2, 0xE0, 0xE1, 0xED, 0xF0, 0xF1, 0xF4):
                low, _ = continuation_range(bytes([lead]))
                partial = bytes([lead])
                while len(partial) < utf8_length(lead):
                    subs.append(partial)
                    partial += bytes([low if len(partial) == 1 else 0x80])
            states += [(part, s) for s in subs]
        return states + [(self.done, None)]


def utf8_length(lead: int) -> int:
    """Bytes of the UTF-8 sequence a lead byte starts."""
    return 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


def continuation_range(partial: bytes) -> tuple[int, int]:
    """The bytes that may follow an unfinished UTF-8 character (xgrammar's rule: no overlong forms, nothing above
    U+10FFFF; it does not single out the surrogate range, so neither does this)."""
    if len(partial) == 1:
        return {0xE0: (0xA0, 0xBF), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(partial[0], (0x80, 0xBF))
    return 0x80, 0xBF


UNREACHABLE = 1 << 14
""":meth:`BudgetCloser.need_after` of a token the grammar does not allow."""


class BudgetCloser:
    """For one vocabulary: the fewest tokens that close an answer from each state, and the budget's decisions.

    ``token_bytes`` is each token id's bytes (xgrammar's ``TokenizerInfo.decoded_vocab``); ``special_ids`` are never
    written inside the answer (xgrammar masks them), ``stop_id`` ends it. Plans and per-state token tables are
    computed on first use and kept (a table is one int16 per token, for the few states rows reach near their
    budget).
    """

    def __init__(self, token_bytes: Sequence[bytes], special_ids: Sequence[int], stop_id: int,
                 layout: Optional[AnswerLayout] = None, max_tables: int = 64):  # fmt: skip
        self.layout = layout if layout is not None else AnswerLayout()
        self.stop_id = stop_id
        skip = set(special_ids) | {stop_id}
        self.token_bytes = [b"" if i in skip else bytes(b) for i, b in enumerate(token_bytes)]
        self.vocab_size = len(self.token_bytes)
        self.by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(self.token_bytes):
            if b and (b not in self.by_bytes or i < self.by_bytes[b]):
                self.by_bytes[b] = i
        self.longest_token = max(len(b) for b in self.by_bytes)
        self._plans: dict[State, tuple[int, ...]] = {}
        self._tables: OrderedDict[State, object] = OrderedDict()
        self._limits: dict[tuple[State, int], object] = {}
        self.max_tables = max_tables

    # -- states and plans ------------------------------------------------------------------------------------------

    def start(self) -> State:
        return self.layout.start()

    def advance(self, state: Optional[State], token: int) -> Optional[State]:
        """The state after ``token`` (the stop token completes nothing: it only ends a complete object)."""
        if state is None:
            return None
        if token == self.stop_id:
            return ("stopped", None) if state[0] == self.layout.done else None
        return self.layout.scan(state, self.token_bytes[token]) if self.token_bytes[token] else None

    def plan(self, state: State) -> tuple[int, ...]:
        """The fewest tokens that close the object from ``state``, the stop token included."""
        plan = self._plans.get(state)
        if plan is None:
            best = min((self._tokenize(text) for text in self.layout.closes(state)), key=len)
            plan = self._plans[state] = best + (self.stop_id,)
        return plan

    def need(self, state: State) -> int:
        """``len(plan(state))``: tokens the budget must still hold for this row to end as valid JSON."""
        return 0 if state[0] == "stopped" else len(self.plan(state))

    def _tokenize(self, text: bytes) -> tuple[int, ...]:
        """``text`` in the fewest tokens of this vocabulary (shortest path over byte positions; every single byte is
        a token of a byte-level BPE vocabulary, so there always is one)."""
        best: list[Optional[tuple[int, ...]]] = [()] + [None] * len(text)
        for end in range(1, len(text) + 1):
            for start in range(max(0, end - self.longest_token), end):
                token = self.by_bytes.get(text[start:end])
                if token is not None and best[start] is not None:
                    candidate = best[start] + (token,)
                    if best[end] is None or len(candidate) < len(best[end]):
                        best[end] = candidate
        if best[-1] is None:
            raise ValueError(f"the vocabulary cannot write {text!r}")
        return best[-1]

    @cached_property
    def _reach(self) -> dict[int, int]:
        """For each part, the most :meth:`need` any state in it or after it has: one token can take a row at most
        there, so a row whose budget left is above that needs no token blocked."""
        worst: dict[int, int] = {}
        for state in self.layout.representative_states():
            worst[state[0]] = max(worst.get(state[0], 0), self.need(state))
        reach, running = {}, 0
        for part in sorted(worst, reverse=True):
            running = max(running, worst[part])
            reach[part] = running
        return reach

    @property
    def most_need(self) -> int:
        """The most tokens a close can take from any state: a row with more left than this is never narrowed."""
        return self._reach[0]

    # -- the budget's decision at one step -------------------------------------------------------------------------

    def decide(self, state: State, left: int):
        """What the budget does to a row in ``state`` with ``left`` tokens left (this step's included): ``None``
        (nothing: no token can take the row past what the budget can close), or the tokens it may write, as an int32
        bitmask row in xgrammar's layout: those after which the close still fits in the ``left - 1`` tokens that
        follow. At ``need == left`` that is only the tokens that close at full speed — the plan's next token, and any
        other way of writing the close in as few tokens, the model's own included, so an answer that ends by itself
        exactly at the budget is not overridden."""
        need = self.need(state)
        if need > left:  # only when the budget was too small from the start (refused at start-up)
            raise RuntimeError(f"answer budget: {need} tokens needed to close from {state!r}, {left} left")
        if left - 1 >= self._reach[state[0]]:
            return None
        return self._limit(state, left - 1)

    def need_after(self, state: State):
        """int16 numpy array over the vocabulary: :meth:`need` after each token from ``state`` (:data:`UNREACHABLE`
        where the grammar does not allow the token)."""
        table = self._tables.get(state)
        if table is not None:
            self._tables.move_to_end(state)
            return table
        import numpy as np

        table = np.full(self.vocab_size, UNREACHABLE, dtype=np.int16)
        if state[0] == self.layout.done:
            table[self.stop_id] = 0
        else:
            step, scan = self.layout.step, self.layout.scan
            unchanged = self.need(state)
            plain = self._plain if state[1] == b"" else None
            for first, ids in self._by_first_byte.items():
                after_first = step(state, first)
                if after_first is None:
                    continue
                for i in ids:
                    if plain is not None and plain[i]:
                        table[i] = unchanged  # a clean string stays clean and in the same field
                        continue
                    after = scan(after_first, self.token_bytes[i][1:])
                    if after is not None:
                        table[i] = self.need(after)
        self._tables[state] = table
        if len(self._tables) > self.max_tables:
            self._tables.popitem(last=False)
        return table

    def _limit(self, state: State, most: int):
        key = (state, most)
        words = self._limits.get(key)
        if words is None:
            import numpy as np

            allowed = self.need_after(state) <= most
            padded = np.zeros(-(-self.vocab_size // 32) * 32, dtype=bool)
            padded[: self.vocab_size] = allowed
            words = np.packbits(padded, bitorder="little").view(np.int32)
            if len(self._limits) > 4 * self.max_tables:
                self._limits.clear()
            self._limits[key] = words
        return words

    @cached_property
    def _by_first_byte(self) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(self.token_bytes):
            if b:
                groups.setdefault(b[0], []).append(i)
        return groups

    @cached_property
    def _plain(self) -> list[bool]:
        """Tokens that leave a clean string clean: whole characters, none of them a quote, backslash or control."""
        plain = []
        for b in self.token_bytes:
            try:
                text = b.decode("utf-8")
            except UnicodeDecodeError:
                plain.append(False)
                continue
            plain.append(bool(b) and '"' not in text and "\\" not in text and min(text) >= " ")
        return plain
