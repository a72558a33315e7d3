"""``python -m healthai synonyms suggest``: candidate synonym-table lines for a person to accept, never a score.

For each record, the predicted and reference names left unmatched by the normalised match (:mod:`healthai.synonyms`)
are paired and ranked by character similarity (rapidfuzz's normalised Indel similarity). A high score is only a
hint: ``1型糖尿病``/``2型糖尿病`` score high and are different diseases, so nothing here enters the table by itself.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

from rapidfuzz import fuzz

from healthai.errors import PositiveInt
from healthai.scored_files import read_predictions, read_references
from healthai.metrics import normalize_diseases
from healthai.synonyms import match_normalized, normalizer_from


def suggest_pairs(pairs_by_record: list[tuple[list[str], list[str]]], normalizer) -> list[tuple[float, str, str, int]]:
    """``(similarity 0-100, predicted, reference, records)`` for each unmatched pair, most similar first."""
    counts: Counter[tuple[str, str]] = Counter()
    for pred, ref in pairs_by_record:
        m = match_normalized(pred, ref, normalizer)
        counts.update({(p, r) for p in m.extra for r in m.missed})
    scored = [(round(fuzz.ratio(p, r), 1), p, r, n) for (p, r), n in counts.items()]
    return sorted(scored, key=lambda row: (-row[0], -row[3], row[1], row[2]))


class Synonyms:
    """Help curate the synonym table that the normalised disease match reads (docs/evaluate.md)."""

    def suggest(self, predictions: Path, references: Path, synonyms: Optional[Path] = None,
                limit: PositiveInt = 50) -> list[tuple[float, str, str, int]]:
        """List unmatched predicted/reference name pairs of the same records, ranked by character similarity.

        Args:
            predictions: JSONL of prediction rows ``{"id", "diseases", ...}``.
            references: JSONL of reference rows ``{"id", "diseases", ...}``.
            synonyms: The synonym table already in use: pairs it matches are not listed.
            limit: How many pairs to print.
        """
        normalizer = normalizer_from(synonyms)
        # An empty reference has no name to pair, so it is no error here (evaluate asks for --allow_empty_references).
        refs = read_references(Path(references), allow_empty=True)
        preds = read_predictions(Path(predictions)).rows
        records = [(normalize_diseases(preds[k].diseases if k in preds else ""), normalize_diseases(ref.diseases))
                   for k, ref in refs.items()]
        rows = suggest_pairs(records, normalizer)[:limit]
        print("similarity\tpredicted\treference\trecords")
        for score, pred, ref, n in rows:
            print(f"{score}\t{pred}\t{ref}\t{n}")
        print("A pair is the same disease only if a person says so: add it as 'canonical<TAB>alias' to the table.")
        return rows
