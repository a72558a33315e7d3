"""Decoding settings, and the answer's token budget: the one number that bounds every generated answer.

The budget is ``max_new_tokens``. Under the JSON constraint every answer closes within it as valid JSON
(:mod:`healthai.answer_grammar`); fit refuses labels longer than it (:func:`check_label_budget`) and saves it with the
adapter (:data:`BUDGET_FILE`), so validate, predict, serve and export use the budget the adapter was trained for unless
told otherwise (:func:`resolve_budget`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from healthai.errors import ConfigError, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, UserError
from healthai.errors import check_declared

DEFAULT_MAX_NEW_TOKENS = 1024
"""The budget when neither the settings nor an adapter give one: room for a reason of several hundred characters
(Qwen2.5 writes common Chinese at about one token a character)."""

BUDGET_FILE = "answer_budget.json"
"""File inside an adapter folder recording the budget fit trained for (a fit ``.ckpt`` holds the same record)."""


@dataclass
class GenerationSettings:
    """How answers are generated, in validation and predict alike.

    These are the only decoding settings in play: :meth:`transformers_config` turns them into a complete
    ``GenerationConfig``, so nothing is inherited from a checkpoint's ``generation_config.json`` (Qwen2.5-7B-Instruct
    ships ``do_sample``, ``temperature 0.7``, ``top_p 0.8``, ``top_k 20`` and ``repetition_penalty 1.05``).

    The fields are documented in this section rather than by a string under each (as :mod:`healthai.label`'s settings
    are): every command's ``--help`` reads a class docstring's sections, while strings under fields are read only where
    jsonargparse parses attribute docstrings, which makes LightningCLI's parser several times slower
    (:mod:`healthai.__main__`).

    Attributes:
        max_new_tokens: The answer's token budget: most tokens generated per record, its end-of-turn token included.
            Constrained, every answer closes within it as valid JSON (parse_status truncated when the budget, not the
            model, ended it); fit refuses labels longer than it. null: the budget the adapter was trained for (fit
            saves it), else 1024.
        do_sample: Sample instead of greedy decoding. Greedy is deterministic and batch-invariant.
        temperature: Sampling temperature (only with ``do_sample``).
        top_p: Nucleus sampling mass (only with ``do_sample``).
        top_k: Sample only among the k most likely tokens (only with ``do_sample``; 0 = no top-k filter).
        repetition_penalty: Divide the scores of tokens already in the prompt or answer by this (1.0 = none, greedy or
            not). The model is trained without one, and a penalty discourages copying findings from the case text
            into ``reason``.
        constrained: Constrain decoding to the answer's JSON form (xgrammar) and close every answer within
            max_new_tokens, so every answer parses. false: free decoding; an answer the budget cuts is repaired or
            fails.
    """

    max_new_tokens: Optional[PositiveInt] = None
    do_sample: bool = False
    temperature: NonNegativeFloat = 0.7  # ranges checked at start, not by a traceback in generate (#29 item 12)
    top_p: float = 0.8
    top_k: NonNegativeInt = 0
    repetition_penalty: PositiveFloat = 1.0
    constrained: bool = True

    def __post_init__(self) -> None:
        check_declared(GenerationSettings, vars(self), "generation.")  # the CLI checks these too, naming the option

    @property
    def budget(self) -> int:
        """``max_new_tokens``, once resolved (:func:`resolve_budget`); the default where nothing resolved it."""
        return self.max_new_tokens if self.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS

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
            max_new_tokens=self.budget, do_sample=self.do_sample, repetition_penalty=self.repetition_penalty,
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
        "no filter" (vLLM before 0.9 rejects 0; it is absent, hence off, in a greedy file). ``max_new_tokens`` is the
        answer's budget, so a server reading this file does not cut answers the adapter was trained to write. The JSON
        constraint is not a file setting: a server applies it per request (``response_format`` with the answer
        schema).
        """
        config: dict[str, Any] = {"bos_token_id": bos_token_id, "eos_token_id": list(eos_token_ids),
                                  "pad_token_id": pad_token_id, "do_sample": self.do_sample,
                                  "max_new_tokens": self.budget,
                                  "repetition_penalty": self.repetition_penalty}  # fmt: skip
        if self.do_sample:
            config.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            config.update(temperature=0.0, top_p=1.0)
        return {k: v for k, v in config.items() if v is not None}


# -- the budget fit saves with the adapter -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerBudget:
    """What fit records with an adapter: the budget it trained for, and its longest label in tokens."""

    max_new_tokens: int
    longest_answer_tokens: int
    """Tokens of the longest training or validation answer, its end-of-turn token included."""
    longest_answer_id: Any = None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / BUDGET_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "AnswerBudget":
        try:
            budget = cls(**data)
            if not all(isinstance(v, int) and v > 0 for v in (budget.max_new_tokens, budget.longest_answer_tokens)):
                raise TypeError("token counts must be positive integers")
        except TypeError as e:
            raise UserError(f"{where}: not an answer budget record ({e})") from None
        return budget

    @classmethod
    def load(cls, directory: str | Path) -> Optional["AnswerBudget"]:
        """The record in an adapter folder, or None when it has none (an adapter of another tool, or of a version of
        this project before the budget was recorded)."""
        path = Path(directory) / BUDGET_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{path}: unreadable answer budget ({e})") from None
        return cls.from_dict(data, str(path))


def resolve_budget(settings: GenerationSettings, recorded: Optional[AnswerBudget]) -> GenerationSettings:
    """The settings with ``max_new_tokens`` set: as given, else the adapter's recorded budget, else the default."""
    if settings.max_new_tokens is not None:
        return settings
    budget = recorded.max_new_tokens if recorded is not None else DEFAULT_MAX_NEW_TOKENS
    return dataclasses.replace(settings, max_new_tokens=budget)


def check_answer_budget(tokenizer, settings: GenerationSettings, recorded: Optional[AnswerBudget] = None,
                        option: str = "generation.max_new_tokens") -> Optional[str]:  # fmt: skip
    """Refuse a budget no answer fits in (ConfigError: not even ``{"diseases": "", "reason": ""}`` and the end-of-turn
    token); return a warning when it is below the longest answer the adapter was trained on (answers that long will be
    closed by the budget, or cut when unconstrained), else None."""
    from healthai.prompts import answer_text

    budget = settings.budget
    empty = len(tokenizer.encode(answer_text("", ""), add_special_tokens=False)) + 1
    if budget < empty:
        raise ConfigError(f"{option}={budget} is below the {empty} tokens of an empty answer object: no answer can be "
                          "complete; raise it")  # fmt: skip
    if recorded is None or recorded.longest_answer_tokens <= budget:
        return None
    ended = "closed by the budget (parse_status truncated)" if settings.constrained else "cut (parse_status repaired)"
    return (f"{option}={budget} is below the longest answer the adapter was trained on "
            f"({recorded.longest_answer_tokens} tokens, id {recorded.longest_answer_id!r}): answers that long will be "
            f"{ended}; leave it null to use the adapter's budget ({recorded.max_new_tokens})")  # fmt: skip


def answer_lengths(dataset) -> list[tuple[int, Any]]:
    """``(tokens, id)`` of each encoded example's answer: what the model must write back, end-of-turn included."""
    return [(len(e["input_ids"]) - e["prompt_len"], e["id"]) for e in dataset.examples]


def check_label_budget(splits: dict[str, Any], budget: int, option: str = "model.generation.max_new_tokens"
                       ) -> Optional[AnswerBudget]:  # fmt: skip
    """Refuse (one line) labels the budget could never write back, before the base is loaded: the model would learn
    answers it is not allowed to finish, and validation would score it against references it cannot reach. Returns the
    record fit saves with the adapter (None when there are no labels). ``splits`` maps a split's name to its encoded
    examples (None = no such split)."""
    problems, longest = [], (0, None)
    for split, dataset in splits.items():
        if dataset is None:
            continue
        lengths = answer_lengths(dataset)
        longest = max([longest, *lengths], key=lambda x: x[0])
        over = [(n, rid) for n, rid in lengths if n > budget]
        if over:
            n, rid = max(over, key=lambda x: x[0])
            problems.append(f"{len(over)} of {len(lengths)} {split} label(s) need more than {option}={budget} tokens "
                            f"(longest {n}, id {rid!r})")  # fmt: skip
    if problems:
        raise UserError("; ".join(problems) + ": the model would learn answers the budget closes before they end; "
                        f"raise {option} to at least {longest[0]} or shorten those labels")  # fmt: skip
    return AnswerBudget(budget, longest[0], longest[1]) if longest[0] else None
