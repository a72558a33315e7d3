"""JSON-constrained generation and the one function that parses a model's answer.

Constraint: xgrammar (vLLM's default structured-output engine) compiles the answer's JSON schema against the
tokenizer once; a fresh logits processor per ``generate`` call masks every token that would break the schema. The
format is pinned to ``json.dumps``'s separators — exactly what the model was trained to write — and each string gets a
``maxLength`` so that a budget of new tokens can close the object.

Parsing: strict ``json.loads``, else json-repair, else failure → ``parse_status`` ``ok`` | ``repaired`` | ``failed``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

from healthai.prompts import ANSWER_JSON_SCHEMA, join_diseases

ParseStatus = Literal["ok", "repaired", "failed"]

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
# A Markdown fence, with or without a language tag; the closing fence may be missing when the reply was cut off.
_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\r?\n?(.*?)(?:```|\Z)", re.DOTALL)

REASON_SEPARATOR = "\n"
"""Joins a list-valued ``reason`` (one finding per line)."""


@dataclass
class ParsedAnswer:
    """A model's answer, parsed. ``diseases``/``reason`` are ``None`` when ``status`` is ``failed``."""

    diseases: Optional[str]
    reason: Optional[str]
    status: ParseStatus
    error: Optional[str] = None
    raw: Optional[str] = None
    """The text that was parsed, kept for ``failed`` rows."""


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


def _as_text(value: Any, key: str) -> str:
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
    return _as_text(obj["diseases"], "diseases"), _as_text(obj["reason"], "reason")


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


def parse_answer(text: str) -> ParsedAnswer:
    """Parse a model's answer: strict JSON (code fences allowed), else json-repair, else ``failed``."""
    try:
        obj, repaired = load_answer_json(text)
        diseases, reason = answer_fields(obj)
    except (ValueError, TypeError, RecursionError) as e:
        return ParsedAnswer(None, None, status="failed", error=str(e), raw=text)
    return ParsedAnswer(diseases, reason, status="repaired" if repaired else "ok", raw=text)


def answer_schema(max_diseases_chars: Optional[int], max_reason_chars: Optional[int]) -> dict[str, Any]:
    """The answer's JSON schema, with optional ``maxLength`` bounds on the two strings."""
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

    def logits_processor(self):
        """A new processor (xgrammar's hold per-row matcher state, so one serves exactly one ``generate`` call)."""
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor(self.compiled)


@dataclass
class GenerationSettings:
    """How answers are generated, in validation and predict alike."""

    max_new_tokens: int = 512
    """Most tokens generated per record (the answer and its end-of-turn token)."""

    do_sample: bool = False
    """Sample instead of greedy decoding. Greedy is deterministic and batch-invariant."""

    temperature: float = 0.7
    """Sampling temperature (only with ``do_sample``)."""

    top_p: float = 0.8
    """Nucleus sampling mass (only with ``do_sample``)."""

    constrained: bool = True
    """Constrain decoding to the answer's JSON schema (xgrammar), so every answer parses."""

    max_diseases_chars: Optional[int] = 64
    """``maxLength`` of the ``diseases`` string under the constraint (None = unbounded)."""

    max_reason_chars: Optional[int] = 400
    """``maxLength`` of the ``reason`` string under the constraint (None = unbounded). Keep the two bounds within
    ``max_new_tokens`` so that the object always closes before the budget runs out."""
