"""The normalised disease section of an ``evaluate`` report: exact and normalised P/R/F1 side by side, the table's
fingerprint, and every pair only the normalised rule matched (so a person can audit each one; see
:mod:`healthai.synonyms`). Exact stays the report's headline ``disease_f1``."""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, NamedTuple, Optional

from healthai.metrics import DiseaseF1, normalize_diseases
from healthai.synonyms import Normalizer, match_normalized


def _prf(metric: DiseaseF1) -> dict[str, float]:
    return {k: float(v) for k, v in metric.compute().items()}


def normalized_section(refs: Mapping[str, Any], preds: Mapping[str, Any], normalizer: Normalizer,
                       top: int = 20) -> dict[str, Any]:
    """``{"fingerprint", "exact": {P, R, F1}, "normalized": {P, R, F1}, "normalized_matches": [...]}`` over every
    reference record (``refs``/``preds`` as :func:`healthai.evaluate.score` keys them; a missing prediction is
    empty)."""
    exact, norm = DiseaseF1(), DiseaseF1(normalizer=normalizer)
    pairs: list[dict[str, Any]] = []
    support: Counter[str] = Counter()
    hits: dict[str, Counter[str]] = {"exact": Counter(), "normalized": Counter()}
    for key, ref in refs.items():
        pred: Optional[Any] = preds.get(key)
        pred_diseases = pred.diseases if pred is not None else ""
        exact.update([pred_diseases], [ref.diseases])
        norm.update([pred_diseases], [ref.diseases])
        pred_items, ref_items = normalize_diseases(pred_diseases or ""), normalize_diseases(ref.diseases)
        m = match_normalized(pred_items, ref_items, normalizer)
        support.update(ref_items)
        hits["exact"].update(t for t in ref_items if t in pred_items)
        hits["normalized"].update(t for t in ref_items if t not in m.missed)
        pairs += [{"id": ref.id, "predicted": p, "reference": t} for p, t in m.normalized_pairs]
    return {"fingerprint": normalizer.fingerprint(), "exact": _prf(exact), "normalized": _prf(norm),
            "normalized_matches": pairs,
            # Recall per reference diagnosis, most frequent first: where the normalised rule changes the picture.
            "per_diagnosis": [{"diagnosis": name, "support": n, "exact_recall": hits["exact"][name] / n,
                               "normalized_recall": hits["normalized"][name] / n}
                              for name, n in support.most_common(top)]}


def normalized_table(section: Mapping[str, Any]) -> str:
    """Exact and normalised P/R/F1 side by side, then the matches only the normalised rule made."""
    lines = [f"disease (synonyms {section['fingerprint']})   exact   normalised"]
    for k in ("precision", "recall", "f1"):
        lines.append(f"  {k:<10} {section['exact'][k]:.4f}  {section['normalized'][k]:.4f}")
    for d in section["per_diagnosis"]:
        lines.append(f"  recall {d['diagnosis']} (n={d['support']}): {d['exact_recall']:.4f}  {d['normalized_recall']:.4f}")
    for m in section["normalized_matches"]:
        lines.append(f"  normalised match, record {m['id']}: {m['predicted']} = {m['reference']}")
    return "\n".join(lines)


class NormalizedRecord(NamedTuple):
    """One record's normalised match counts, as :func:`healthai.compare.f1_difference_interval` reads them."""

    matched: list[str]
    extra: list[str]
    missed: list[str]


def normalized_records(refs: Mapping[str, Any], preds: Mapping[str, Any], normalizer: Normalizer
                       ) -> list[NormalizedRecord]:
    """Per reference record (in ``refs`` order), its normalised match (a missing prediction is empty)."""
    out = []
    for key, ref in refs.items():
        pred = preds.get(key)
        m = match_normalized(normalize_diseases(pred.diseases if pred is not None else ""),
                             normalize_diseases(ref.diseases), normalizer)
        out.append(NormalizedRecord(m.matched, m.extra, m.missed))
    return out
