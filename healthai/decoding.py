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

_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?\s*```\s*$", re.S)


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
    """``'```json\\n{...}\\n```'`` → ``'{...}'``; other text unchanged."""
    m = _FENCE.match(text)
    return m.group(1) if m else text


def _fields(obj: Any) -> tuple[str, str]:
    """Pull ``diseases`` and ``reason`` out of a parsed object, or raise ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("diseases", "reason") if k not in obj]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    diseases, reason = obj["diseases"], obj["reason"]
    if isinstance(diseases, list) and all(isinstance(d, str) for d in diseases):
        diseases = join_diseases(diseases)
    if not isinstance(diseases, str) or not isinstance(reason, str):
        raise ValueError("fields 'diseases' and 'reason' must be strings")
    return diseases, reason


def parse_answer(text: str) -> ParsedAnswer:
    """Parse a model's answer text: strict JSON (code fences allowed), else json-repair, else ``failed``."""
    import json_repair

    body = strip_code_fence(text.strip())
    try:
        # strict=False admits raw control characters (a tab) inside strings: unambiguous, so nothing is repaired.
        return ParsedAnswer(*_fields(json.loads(body, strict=False)), status="ok", raw=text)
    except (json.JSONDecodeError, ValueError) as strict_error:
        error = str(strict_error)
    try:
        repaired = json_repair.loads(body)
        return ParsedAnswer(*_fields(repaired), status="repaired", raw=text)
    except (ValueError, TypeError, RecursionError) as e:
        return ParsedAnswer(None, None, status="failed", error=f"{error}; repair: {e}", raw=text)


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
