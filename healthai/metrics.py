"""Evaluation metrics shared by ``python -m healthai evaluate`` and validation inside the LightningModule.

:func:`answer_metrics` is the one collection both use: validation logs each of its values as ``val/<name>`` and
``evaluate`` reports and tabulates them (``compare`` too), so a new metric is one :class:`AnswerMetric` subclass and
one line in :data:`ANSWER_METRICS`.

Each metric is a torchmetrics :class:`~torchmetrics.Metric` whose states are plain counters or sums registered with
``dist_reduce_fx="sum"``, so under DDP every process updates on its own shard and ``compute()`` adds the shards up:
the result equals one process seeing every record. The per-record helpers (:func:`normalize_diseases`,
:func:`match_diseases`, :func:`rouge_l_char`) are public so that per-record reports use exactly the same rules.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Optional, Protocol, Sequence, Union

import torch
from rapidfuzz.distance import LCSseq
from torchmetrics import Metric, MetricCollection

from healthai.prompts import join_diseases

if TYPE_CHECKING:
    from healthai.synonyms import Normalizer

PARSE_STATUSES = ("ok", "repaired", "truncated", "failed")
"""Values of a prediction row's ``parse_status`` (:class:`healthai.decoding.ParsedAnswer`); only ``ok`` counts as
valid JSON: a ``truncated`` answer parses, but the token budget closed it before the model did, so it is
not the answer the model wrote."""

DiseasesField = Union[str, Sequence[str], None]
"""A ``diseases`` value as found in data: one string, a list of names (joined with ``；``) or missing."""

# An enumeration marker, matched after NFKC (which has already turned full-width "（１）", "１．", "１）" into ASCII;
# the full-width forms stay in the classes anyway so the pattern does not depend on that):
#   - a bare digit run wrapped in brackets: "(1)", "（1）" — but not "(1级)", whose bracket holds more than digits;
#   - a digit run followed by "、", ".", "．", ")" or "）": "1、", "1.", "1)".
# The lookbehind keeps digits that end a token out: "COVID-19." or "维生素B12、" are names, not markers. A digit run
# followed by a CJK character ("2型糖尿病") never matches. "1.5" is a decimal, not marker "1." followed by "5".
_MARKER = re.compile(
    r"[(（]\s*[0-9]+\s*[)）]"
    r"|(?<![0-9A-Za-z.．\-])[0-9]+(?:[、)）]|[.．](?![0-9]))"
)
_SEPARATORS = re.compile(r"[,，、;；\r\n]+")
# Stripped from both ends of each item: whitespace (covers spaces after NFKC) and stray sentence punctuation.
_EDGE = re.compile(r"^[\s?？。.:：]+|[\s?？。.:：]+$")


def normalize_diseases(text: Optional[str]) -> list[str]:
    """Split a ``diseases`` string into normalised disease names, in order of first occurrence.

    Steps, in this order: Unicode NFKC; enumeration markers (``1、`` ``1.`` ``1．`` ``1)`` ``1）`` ``(1)`` ``（1）``)
    become separators, so that glued lists such as ``1、慢性胃肠炎2、功能性消化不良`` split; split on ``,`` ``，``
    ``、`` ``;`` ``；`` and newlines; strip whitespace and ``?？。.:：`` at both ends of each item; drop empty items
    and duplicates. ``None`` or ``""`` gives ``[]``.
    """
    if not text:
        return []
    text = unicodedata.normalize("NFKC", text)
    # A marker is replaced by a separator, not deleted: "炎2、功" must split into "炎" and "功".
    text = _MARKER.sub("\n", text)
    items: list[str] = []
    seen: set[str] = set()
    for raw in _SEPARATORS.split(text):
        item = _EDGE.sub("", raw)
        if item and item not in seen:
            seen.add(item)
            items.append(item)
    return items


def _diseases_text(diseases: DiseasesField) -> str:
    """One ``diseases`` string from whatever a row holds; a missing value is an empty prediction."""
    if diseases is None:
        return ""
    return join_diseases(diseases)


class DiseaseMatch(NamedTuple):
    """How one record's predicted disease names compare with the reference names."""

    matched: list[str]
    """Predicted names that are also reference names (true positives), in prediction order."""
    missed: list[str]
    """Reference names not predicted (false negatives), in reference order."""
    extra: list[str]
    """Predicted names not in the reference (false positives), in prediction order."""


def match_diseases(pred: DiseasesField, target: DiseasesField) -> DiseaseMatch:
    """Compare two ``diseases`` fields by exact equality of their :func:`normalize_diseases` items."""
    pred_items = normalize_diseases(_diseases_text(pred))
    target_items = normalize_diseases(_diseases_text(target))
    target_set, pred_set = set(target_items), set(pred_items)
    return DiseaseMatch(
        matched=[p for p in pred_items if p in target_set],
        missed=[t for t in target_items if t not in pred_set],
        extra=[p for p in pred_items if p not in target_set],
    )


def _match_normalized(pred: DiseasesField, target: DiseasesField, normalizer: "Normalizer") -> DiseaseMatch:
    """:func:`match_diseases` through ``normalizer`` (one to one, exact first)."""
    from healthai.synonyms import match_normalized

    pred_items, target_items = normalize_diseases(_diseases_text(pred)), normalize_diseases(_diseases_text(target))
    m = match_normalized(pred_items, target_items, normalizer)
    return DiseaseMatch(m.matched, m.missed, m.extra)


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings, character by character.

    rapidfuzz's bit-parallel LCS (``rapidfuzz.distance.LCSseq``, C++): reasons are hundreds of characters and
    evaluation runs over thousands of them. The tests check it against the plain O(n·m) dynamic programme.
    """
    if not a or not b:
        return 0
    return LCSseq.similarity(a, b)


def _reason_chars(text: str) -> str:
    """Characters compared by ROUGE-L: NFKC (full- and half-width punctuation agree) without whitespace (layout)."""
    return "".join(unicodedata.normalize("NFKC", text).split())


def rouge_l_char(pred: Optional[str], target: str) -> float:
    """ROUGE-L F-measure (beta = 1) between two texts as character sequences; 0 when either is empty.

    P = LCS/len(pred), R = LCS/len(target), F = 2PR/(P+R) = 2·LCS/(len(pred)+len(target)). Chinese has no spaces,
    so characters are the tokens; text is NFKC-normalised and whitespace is dropped first.
    """
    p, t = _reason_chars(pred or ""), _reason_chars(target)
    lcs = lcs_length(p, t)
    if lcs == 0:
        return 0.0
    return 2.0 * lcs / (len(p) + len(t))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` as a float tensor, 0 where ``den`` is 0 (an undefined score counts as 0)."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num)).float()


class Answer(Protocol):
    """What the metrics read of one predicted answer (:class:`healthai.decoding.ParsedAnswer` is one)."""

    @property
    def diseases(self) -> DiseasesField: ...

    @property
    def reason(self) -> Optional[str]: ...

    @property
    def status(self) -> str:
        """One of :data:`PARSE_STATUSES`."""
        ...


Reference = Mapping[str, Any]
"""A reference record as labelled data holds it: ``{"diseases": ..., "reason": ...}`` (``reason`` may be None)."""


class AnswerMetric(Metric):
    """A metric of :func:`answer_metrics`: it is fed a batch of answers and their references.

    ``answers[i]`` is record ``i``'s answer, or ``None`` when the record has no prediction (``evaluate``'s missing
    records; validation always has one); ``references[i]`` its reference. The default :meth:`update_answers` passes
    both to ``update``, so a new metric may simply take ``update(answers, references)``; the metrics below keep their
    own narrower ``update`` (strings, statuses) and override :meth:`update_answers` to pick their inputs.
    """

    fields: tuple[str, ...] = ()
    key_format: str = "{name}_{field}"
    """How :class:`AnswerMetrics` names each field's value."""
    """The keys of the dict ``compute()`` returns (reported as ``<name>_<key>``), or ``()`` when it returns one
    tensor (reported as ``<name>``)."""

    def update_answers(self, answers: Sequence[Optional[Answer]], references: Sequence[Reference]) -> None:
        """Add one batch of answers and references."""
        self.update(answers, references)

    def defined(self) -> bool:
        """Whether this process's states define a value (``compute()`` gives 0 where there is nothing to measure;
        ``evaluate`` reports null then). Read it without DDP, or after the states are synced."""
        return True


class DiseaseF1(AnswerMetric):
    """Disease-set precision, recall and F1, micro-averaged: TP, FP and FN are summed over records first.

    A record with no predicted names (including a failed or missing prediction) adds only false negatives.
    ``compute()`` returns ``{"precision", "recall", "f1"}`` as tensors; each is 0 when its denominator is 0.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    fields = ("precision", "recall", "f1")

    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor

    def __init__(self, normalizer: Optional["Normalizer"] = None, **kwargs: Any) -> None:
        """``normalizer``: match names through :func:`healthai.synonyms.match_normalized` (exact matches always
        count; see docs/evaluate.md), instead of by exact equality only."""
        super().__init__(**kwargs)
        self.normalizer = normalizer
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[DiseasesField], targets: Sequence[DiseasesField]) -> None:
        """Add one batch: ``preds[i]`` and ``targets[i]`` are the ``diseases`` strings of record ``i``."""
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
        tp = fp = fn = 0
        for pred, target in zip(preds, targets):
            if self.normalizer is None:
                m = match_diseases(pred, target)
            else:
                m = _match_normalized(pred, target, self.normalizer)
            tp, fp, fn = tp + len(m.matched), fp + len(m.extra), fn + len(m.missed)
        self.tp += tp
        self.fp += fp
        self.fn += fn

    def update_answers(self, answers: Sequence[Optional[Answer]], references: Sequence[Reference]) -> None:
        """A record without an answer has no predicted names."""
        self.update([a.diseases if a is not None else "" for a in answers], [r["diseases"] for r in references])

    def compute(self) -> dict[str, torch.Tensor]:
        precision = _ratio(self.tp, self.tp + self.fp)
        recall = _ratio(self.tp, self.tp + self.fn)
        # 2PR/(P+R) written in counts: exact, and 0 exactly when P+R is 0 (TP = 0).
        f1 = _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)
        return {"precision": precision, "recall": recall, "f1": f1}


class ParseStatusRate(AnswerMetric):
    """Share of prediction rows whose ``parse_status`` is one of ``statuses``; 0 if there are none.

    Among answers, a record without one is no prediction row and is not counted (a missing record does not lower
    the rate).

    An unknown status (a typo such as ``OK``) raises ValueError instead of silently counting as another.
    """

    is_differentiable = False
    full_state_update = False

    hits: torch.Tensor
    total: torch.Tensor

    def __init__(self, statuses: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.statuses = tuple(statuses)
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, statuses: Sequence[str]) -> None:
        """Add one batch of ``parse_status`` values (one of :data:`PARSE_STATUSES` each)."""
        unknown = sorted({s for s in statuses if s not in PARSE_STATUSES})
        if unknown:
            raise ValueError(f"unknown parse_status {unknown}; expected one of {PARSE_STATUSES}")
        self.hits += sum(s in self.statuses for s in statuses)
        self.total += len(statuses)

    def update_answers(self, answers: Sequence[Optional[Answer]], references: Sequence[Reference]) -> None:
        self.update([a.status for a in answers if a is not None])

    def defined(self) -> bool:
        return int(self.total) > 0

    def compute(self) -> torch.Tensor:
        return _ratio(self.hits, self.total)


class JsonValidRate(ParseStatusRate):
    """Share of prediction rows whose ``parse_status`` is ``ok``: strict JSON the model closed itself (``repaired``,
    ``truncated`` and ``failed`` are not); 0 if none."""

    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(("ok",), **kwargs)


class TruncatedRate(ParseStatusRate):
    """Share of prediction rows whose ``parse_status`` is ``truncated`` (the token budget closed the answer); 0 if none."""

    higher_is_better = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(("truncated",), **kwargs)


class ReasonRougeL(AnswerMetric):
    """Character-level ROUGE-L F (see :func:`rouge_l_char`), averaged over records that have a reference reason.

    Records whose reference reason is ``None`` or blank are skipped; ``count`` says how many were scored, and
    ``compute()`` is 0 when none was (callers that must tell "no reference reasons" apart check ``count``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    score_sum: torch.Tensor
    count: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # float64: a sum over many records should not lose the last digits that float32 would.
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[Optional[str]], targets: Sequence[Optional[str]]) -> None:
        """Add one batch of predicted and reference reasons; a ``None`` prediction scores 0."""
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
        total, n = 0.0, 0
        for pred, target in zip(preds, targets):
            if target is None or not target.strip():
                continue
            total += rouge_l_char(pred, target)
            n += 1
        self.score_sum += total
        self.count += n

    def update_answers(self, answers: Sequence[Optional[Answer]], references: Sequence[Reference]) -> None:
        """A record without an answer scores 0 (when its reference has a reason)."""
        self.update([a.reason if a is not None else None for a in answers], [r["reason"] for r in references])

    def defined(self) -> bool:
        return int(self.count) > 0

    def compute(self) -> torch.Tensor:
        return _ratio(self.score_sum, self.count)


ANSWER_METRICS: dict[str, Callable[[], AnswerMetric]] = {
    "disease": DiseaseF1,
    "json_valid": JsonValidRate,
    "truncated": TruncatedRate,
    "reason_rougeL": ReasonRougeL,
}
"""The metrics of generated answers, by name: validation logs ``val/<name>`` (``val/disease_f1``...), ``evaluate``
reports ``<name>`` (see :data:`healthai.evaluate.REPORT_NAMES` for the older report names) and ``compare`` shows
them. Adding a metric: an :class:`AnswerMetric` subclass and one line here."""


class AnswerMetrics(MetricCollection):
    """The collection :func:`answer_metrics` builds: one ``update(answers, references)`` for every metric, and a
    ``compute()`` that gives one flat dict of named values.

    Each metric syncs its own states under DDP in ``compute()`` (a collective: every process must call it), as the
    metrics do alone. Metrics are kept in name order (as :class:`~torchmetrics.MetricCollection` keeps them).
    """

    def __init__(self, metrics: dict[str, AnswerMetric]) -> None:
        # Compute groups share states between metrics that look alike; these are fed different inputs.
        super().__init__(metrics, compute_groups=False)

    def update(  # type: ignore[override]
        self, answers: Sequence[Optional[Answer]], references: Sequence[Reference]
    ) -> None:
        """Add one batch: ``answers[i]`` (``None``: no prediction) for ``references[i]``."""
        if len(answers) != len(references):
            raise ValueError(f"got {len(answers)} answers for {len(references)} references")
        for metric in self.values(copy_state=False):
            metric.update_answers(answers, references)

    def names(self) -> list[str]:
        """The keys of :meth:`compute`'s dict, in its order, known before any update."""
        return [key for name, metric in self.items(keep_base=True, copy_state=False) for key in _keys(name, metric)]

    def compute(self) -> dict[str, torch.Tensor]:
        """``{name: value}``; a metric whose ``compute()`` is a dict gives ``<name>_<key>`` for each of its keys."""
        out: dict[str, torch.Tensor] = {}
        for name, metric in self.items(keep_base=True, copy_state=False):
            value = metric.compute()
            if not metric.fields:
                out[name] = value
                continue
            # names() reads the fields before any compute: a metric must give exactly those.
            if not isinstance(value, dict) or list(value) != list(metric.fields):
                raise ValueError(f"{type(metric).__name__}.compute() gave {value!r}, not the fields {metric.fields}")
            out.update({metric.key_format.format(name=name, field=field): value[field] for field in metric.fields})
        return out

    def defined(self) -> dict[str, bool]:
        """For each key of :meth:`compute`, whether its metric had something to measure (see
        :meth:`AnswerMetric.defined`)."""
        return {key: metric.defined() for name, metric in self.items(keep_base=True, copy_state=False)
                for key in _keys(name, metric)}  # fmt: skip


def _keys(name: str, metric: AnswerMetric) -> list[str]:
    return [metric.key_format.format(name=name, field=field) for field in metric.fields] if metric.fields else [name]


def answer_metrics(normalizer: Optional["Normalizer"] = None) -> AnswerMetrics:
    """A fresh collection of :data:`ANSWER_METRICS`, the one validation and ``evaluate`` use; with ``normalizer``,
    also ``disease_normalized`` (keys ``disease_<field>_normalized``: the normalised match beside the exact one)."""
    metrics: dict[str, AnswerMetric] = {name: make() for name, make in ANSWER_METRICS.items()}
    if normalizer is not None:
        metrics["disease_normalized"] = NormalizedDiseaseF1(normalizer)
    return AnswerMetrics(metrics)


class NormalizedDiseaseF1(DiseaseF1):
    """:class:`DiseaseF1` through a :class:`~healthai.synonyms.Normalizer`, reported as ``disease_<field>_normalized``."""

    key_format = "disease_{field}_normalized"
