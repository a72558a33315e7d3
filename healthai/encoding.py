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

from healthai.prompts import PromptStyle, answer_text

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
