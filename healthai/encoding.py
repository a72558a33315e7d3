"""Tokenisation, the one truth for the loss mask: a case text becomes prompt token ids here and nowhere else.

The data module (fit, validate, predict), serve, export and the scripts all build prompts with :func:`prompt_ids`
/ :func:`fit_case_text` (and :func:`prompt_text` where a string is needed), so a prompt cannot differ between
training and inference. A training example is the prompt plus the answer (:func:`healthai.prompts.answer_text`) and
the end-of-turn token, which the chat template itself names (:func:`end_of_turn_id`); the loss covers only that
answer.
"""

from __future__ import annotations

from typing import Any, Optional

from torch.utils.data import Dataset

from healthai.errors import UserError
from healthai.prompts import PromptStyle, answer_text, join_diseases
from healthai.records import id_key

IGNORE_INDEX = -100
"""Label value that the loss skips (prompt, padding)."""

_ANSWER_PROBE = "HEALTHAI_ANSWER_PROBE"
"""An assistant message :func:`end_of_turn_id` renders, to see what the chat template writes after an answer."""


def end_of_turn_id(tokenizer) -> int:
    """Id of the token that ends the assistant's turn: the last token the model learns to write, and the token
    generation stops at.

    Read from the tokenizer, not assumed: the special token the chat template writes right after an assistant message
    (ChatML's ``<|im_end|>`` for Qwen, ``<|eot_id|>`` for Llama 3, ...), else ``tokenizer.eos_token``. The template
    comes first because an instruct template can close a turn with another token than the tokenizer's EOS (a Qwen base
    tokenizer's EOS is ``<|endoftext|>``, while its chat template closes turns with ``<|im_end|>``). Raises ValueError
    when the tokenizer names neither.
    """
    try:
        chat = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _ANSWER_PROBE}]
        rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    except ValueError:  # no chat template
        rendered = ""
    if _ANSWER_PROBE in rendered:
        after = rendered[rendered.rindex(_ANSWER_PROBE) + len(_ANSWER_PROBE) :]
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        # A special token, not text: what follows may also be plain text (a newline) that no model stops at.
        if ids and ids[0] in tokenizer.all_special_ids:
            return ids[0]
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer names no end-of-turn token: its chat template writes no special token after an "
                     "assistant message and it has no eos_token")  # fmt: skip


def prompt_text(tokenizer, prompt: PromptStyle, case_text: str) -> str:
    """The chat of :func:`prompt_ids` as text (for tools that tokenise it themselves, such as TRL)."""
    return tokenizer.apply_chat_template(prompt.messages(case_text), tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, prompt: PromptStyle, case_text: str) -> list[int]:
    """Token ids of the chat up to and including the assistant header (``<|im_start|>assistant\\n``)."""
    ids = tokenizer.apply_chat_template(prompt.messages(case_text), tokenize=True, add_generation_prompt=True)
    # transformers v5 returns a BatchEncoding here, v4 a list.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def fit_case_text(tokenizer, prompt: PromptStyle, case_text: str, budget: int) -> tuple[list[int], bool]:
    """Prompt ids for ``case_text``, trimming the case text's tail until the prompt has at most ``budget`` tokens.

    Returns ``(ids, trimmed)``. Trimming is by characters (binary search), never by cutting token ids, so the kept text
    re-tokenises exactly as the model will see it at inference. Raises ValueError if even an empty case text does not
    fit.
    """
    ids = prompt_ids(tokenizer, prompt, case_text)
    if len(ids) <= budget:
        return ids, False
    best = prompt_ids(tokenizer, prompt, "")
    if len(best) > budget:
        raise ValueError(f"the prompt alone needs more than {budget} tokens; raise max_length")
    lo, hi = 0, len(case_text)  # lo chars always fit, hi chars do not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cand = prompt_ids(tokenizer, prompt, case_text[:mid])
        if len(cand) <= budget:
            lo, best = mid, cand
        else:
            hi = mid
    return best, True


def encode_example(
    tokenizer, prompt: PromptStyle, case_text: str, diseases: str, reason: str, max_length: int
) -> dict[str, Any]:
    """Tokenise one training example: ``input_ids``, ``labels`` (−100 except the answer and end-of-turn tokens),
    ``prompt_len`` and ``trimmed``.

    The answer is never cut: when the example is too long, the case text is trimmed (:func:`fit_case_text`).
    """
    answer = tokenizer(answer_text(diseases, reason), add_special_tokens=False)["input_ids"]
    answer = list(answer) + [end_of_turn_id(tokenizer)]
    budget = max_length - len(answer)
    if budget <= 0:
        raise ValueError(f"the answer alone is {len(answer)} tokens, over max_length={max_length}")
    ids, trimmed = fit_case_text(tokenizer, prompt, case_text, budget)
    return {
        "input_ids": ids + answer,
        "labels": [IGNORE_INDEX] * len(ids) + answer,
        "prompt_len": len(ids),
        "trimmed": trimmed,
    }


class EncodedDataset(Dataset):
    """Examples tokenised once, up front (records are short; re-tokenising every epoch would waste CPU)."""

    def __init__(self, examples: list[dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]


# Refuse rather than derive caps from the data: the check runs before the base is loaded, so a refusal costs seconds,
# not the hours of a 7B run; caps grown silently to a runaway teacher label (a 2,000-character reason) would raise
# every answer's token budget and make the adapter override predict's settings, a second, hidden source of decoding
# settings. Refused, the user picks: raise the caps (in the fit and the predict config) or fix those labels.
def check_answer_caps(splits: dict[str, Optional[EncodedDataset]], max_diseases_chars: Optional[int],
                      max_reason_chars: Optional[int]) -> None:  # fmt: skip
    """Refuse (:class:`~healthai.errors.UserError`, one line) labels that the length-capped JSON constraint could not
    write back: a field at or over its cap (a generated field that reaches its cap is reported ``truncated``), or
    holding a character a capped string cannot hold (:data:`healthai.decoding.CAPPED_UNWRITABLE`: a quote, a
    backslash, a newline or another control character). The model would learn answers it is not allowed to finish,
    and validation would score it against references it cannot reach. ``splits`` maps a split's name to its encoded
    examples (``None`` = no such split); a ``None`` cap is unbounded (and allows escapes)."""
    from healthai.decoding import CAPPED_UNWRITABLE

    caps = {"diseases": max_diseases_chars, "reason": max_reason_chars}
    problems = []
    for split, dataset in splits.items():
        if dataset is None:
            continue
        bad_ids, longest, n_over, unwritable = set(), {}, {}, []
        for example in dataset.examples:
            for key, cap in caps.items():
                if cap is None:
                    continue
                value = join_diseases(example[key]) if key == "diseases" else example[key]
                if len(value) >= cap:
                    bad_ids.add(id_key(example["id"]))
                    n_over[key] = n_over.get(key, 0) + 1
                    if len(value) > longest.get(key, (-1, None))[0]:
                        longest[key] = (len(value), example["id"])
                if CAPPED_UNWRITABLE.search(value):
                    bad_ids.add(id_key(example["id"]))
                    unwritable.append((example["id"], key))
        if not bad_ids:
            continue
        parts = [f"{n_over[key]} with {key} of {caps[key]}+ characters (model.generation.max_{key}_chars {caps[key]};"
                 f" longest {longest[key][0]}, id {longest[key][1]!r})" for key in caps if key in n_over]  # fmt: skip
        if unwritable:
            rid, key = unwritable[0]
            parts.append(f"{len(unwritable)} field(s) holding a quote, backslash, newline or other control character, "
                         f"which a capped string cannot hold (e.g. id {rid!r}, {key})")  # fmt: skip
        problems.append(f"{len(bad_ids)} of {len(dataset)} {split} label(s) cannot be written under the answer caps: "
                        + ", ".join(parts))  # fmt: skip
    if problems:
        fix = ("raise the caps above the longest label (in this config and predict's; max_new_tokens must hold them) "
               "or set them to null (uncapped strings allow escapes), or fix those labels")  # fmt: skip
        raise UserError("; ".join(problems) + f"; the model would learn answers it may not finish: {fix}")
