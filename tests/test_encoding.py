"""The end-of-turn token comes from the tokenizer (its chat template, else its EOS), not from a hard-coded name."""

from __future__ import annotations

import pytest

from conftest import labelled_records
from shared_tokenizers import SharedTokenizers
from healthai.encoding import IGNORE_INDEX, encode_example, end_of_turn_id
from healthai.prompts import PromptStyle, answer_text

IM_END, ENDOFTEXT = 151645, 151643

# ChatML, except that a turn ends with <|endoftext|> rather than <|im_end|> (as another model family's template would
# end it with its own token, Llama 3's <|eot_id|> say).
OTHER_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|endoftext|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def own_tokenizer(tiny_model_dir):
    """A tokenizer of this module's own: the tests change its template and EOS, which the session's must not see."""
    return SharedTokenizers.load_uncached(tiny_model_dir)


@pytest.fixture
def tok(own_tokenizer):
    """:func:`own_tokenizer`, its chat template and EOS put back after each test (``monkeypatch`` cannot: the EOS is
    no plain attribute)."""
    template, eos = own_tokenizer.chat_template, own_tokenizer.eos_token
    yield own_tokenizer
    own_tokenizer.chat_template, own_tokenizer.eos_token = template, eos


def test_qwen_chat_template_ends_the_turn_with_im_end(tok):
    assert end_of_turn_id(tok) == IM_END


def test_the_chat_templates_token_wins_over_eos(tok):
    # A Qwen base tokenizer: EOS <|endoftext|>, but its ChatML template closes turns with <|im_end|>.
    tok.eos_token = "<|endoftext|>"
    assert tok.eos_token_id == ENDOFTEXT
    assert end_of_turn_id(tok) == IM_END


def test_examples_end_with_the_token_the_template_closes_turns_with(tok):
    tok.chat_template = OTHER_TEMPLATE
    assert end_of_turn_id(tok) == ENDOFTEXT
    record = labelled_records(1)[0]
    prompt = PromptStyle()
    enc = encode_example(tok, prompt, record["feature_content"], record["diseases"], record["reason"], 4096)
    answer = {"role": "assistant", "content": answer_text(record["diseases"], record["reason"])}
    full = tok.apply_chat_template(prompt.messages(record["feature_content"]) + [answer], tokenize=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    assert full[-2:] == [ENDOFTEXT, tok.encode("\n")[0]]
    assert enc["input_ids"] == full[:-1]  # the template's own turn, up to and including its end token
    learned = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tok.decode(learned) == answer["content"] + "<|endoftext|>"


def test_without_a_chat_template_the_eos_token_ends_the_turn(tok):
    tok.chat_template = None
    tok.eos_token = "<|endoftext|>"
    assert end_of_turn_id(tok) == ENDOFTEXT


def test_a_template_closing_turns_with_plain_text_falls_back_to_eos(tok):
    tok.chat_template = OTHER_TEMPLATE.replace("<|endoftext|>", "\\n")
    tok.eos_token = "<|endoftext|>"
    assert end_of_turn_id(tok) == ENDOFTEXT


def test_no_template_token_and_no_eos_is_an_error(tok):
    tok.chat_template = None
    tok.eos_token = None
    with pytest.raises(ValueError, match="no end-of-turn token"):
        end_of_turn_id(tok)
