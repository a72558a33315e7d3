"""The one place that turns a case record into chat messages and an answer string.

Training, validation generation, prediction and teacher labelling all call :class:`PromptStyle`; fit saves the style
next to the adapter (``prompt.json``) and predict loads it back, so the training and inference prompts cannot drift.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

PROMPT_FILE = "prompt.json"
"""File name of the saved prompt settings inside an ``adapter/`` folder."""

ANSWER_KEYS = ("diseases", "reason")
"""Keys of the model's answer object, in the order the answer string is built."""

DISEASE_SEPARATOR = "；"
"""Joins a list-valued ``diseases`` field into one string (the separator used in the official examples)."""

DEFAULT_SYSTEM = (
    "你是一名经验丰富的临床医生。请仔细阅读用户提供的病历（性别、年龄、主诉、现病史、既往史、体格检查、辅助检查等），"
    "给出最可能的诊断及诊断依据。只输出一个JSON对象，不要输出其他内容，格式为："
    '{"diseases": "诊断名称，多个诊断用；分隔", "reason": "逐条列出的诊断依据"}'
)

DEFAULT_USER_TEMPLATE = "病历如下：\n{case}"

# The schema both the constrained decoder and the teacher's JSON mode aim at.
ANSWER_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"diseases": {"type": "string"}, "reason": {"type": "string"}},
    "required": list(ANSWER_KEYS),
    "additionalProperties": False,
}


def join_diseases(diseases: str | Sequence[str]) -> str:
    """Return ``diseases`` as one string; a list of names is joined with :data:`DISEASE_SEPARATOR`."""
    if isinstance(diseases, str):
        return diseases
    return DISEASE_SEPARATOR.join(str(d).strip() for d in diseases if str(d).strip())


def answer_text(diseases: str | Sequence[str], reason: str) -> str:
    """The exact text the model learns to write: built by ``json.dumps``, never by string formatting."""
    return json.dumps({"diseases": join_diseases(diseases), "reason": reason}, ensure_ascii=False)


@dataclass
class PromptStyle:
    """How a case record is shown to the model."""

    system: str = DEFAULT_SYSTEM
    """System message. It states the task and the JSON answer format."""

    user_template: str = DEFAULT_USER_TEMPLATE
    """User message; ``{case}`` is replaced by the record's ``feature_content``."""

    def __post_init__(self) -> None:
        if "{case}" not in self.user_template:
            raise ValueError(f"user_template must contain '{{case}}', got {self.user_template!r}")

    def messages(self, case_text: str) -> list[dict[str, str]]:
        """Chat messages (system + user) for one record; the model's turn comes next."""
        # str.replace, not str.format: case text and template may hold literal braces.
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": self.user_template.replace("{case}", case_text)},
        ]

    def save(self, directory: str | Path) -> Path:
        """Write the settings to ``directory/prompt.json`` and return that path."""
        path = Path(directory) / PROMPT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "PromptStyle":
        """Read the settings that :meth:`save` wrote (an ``adapter/`` folder)."""
        path = Path(directory) / PROMPT_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no saved prompt settings; was this folder written by `healthai fit`?")
        except ValueError as e:  # not JSON, or not UTF-8
            raise ValueError(f"{path}: unreadable prompt settings ({e})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "PromptStyle":
        """The settings ``dataclasses.asdict`` gave (a fit ``.ckpt`` records them so); ValueError naming ``where`` for
        anything else."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known) if isinstance(data, dict) else type(data).__name__
        if unknown:
            raise ValueError(f"{where}: unknown prompt settings {unknown}")
        try:
            return cls(**data)
        except ValueError as e:  # a user_template without {case}
            raise ValueError(f"{where}: {e}") from None


JUDGE_SYSTEM = (
    "你是一名经验丰富的临床医生，负责核对诊断名称。用户给出两个诊断名称列表A和B。请找出A中与B中指同一种疾病的名称对"
    "（同义词、简称、是否写出分级或“原发性”等不改变疾病本身的写法）。不同的疾病不能配对：例如1型糖尿病与2型糖尿病、"
    "甲状腺功能亢进症与甲状腺功能减退症、肺炎与肺癌、糖尿病与糖尿病肾病都是不同的疾病。每个名称最多出现在一对中。"
    '只输出一个JSON对象，不要输出其他内容，格式为：{"pairs": [["A1", "B2"]]}；没有相同的疾病时输出 {"pairs": []}'
)
"""The judge's instructions (``evaluate --judge_base_url``): which names of list A name the same disease as which
names of list B, answered by the labels the lists are shown with."""

JUDGE_LIST_NAMES = ("A", "B")
"""The labels of the judge's two lists; a name is shown (and answered) as ``A1``, ``B2``, ..."""


def judge_messages(list_a: Sequence[str], list_b: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages asking the judge which names of ``list_a`` name the same disease as which names of ``list_b``.

    Each name is on a line of its own behind its label (``A1. 高血压病``): the judge answers with labels, never by
    copying a name (which it could alter), so every answer maps back to exactly one name."""
    lines = []
    for letter, names in zip(JUDGE_LIST_NAMES, (list_a, list_b)):
        lines.append(f"列表{letter}：")
        lines += [f"{letter}{i}. {name}" for i, name in enumerate(names, 1)]
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]
