"""The ``disease_judge`` section of an ``evaluate`` report: each record's names split into exact matches and what is
left for the judge, the judge's answers in both orders combined (only agreed pairs, matched one to one), judge
P/R/F1 and the agreement of the two orders, printed as its own block (see :mod:`healthai.judge` for how the judge is
asked). Exact stays the report's headline ``disease_f1``."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from healthai.judge import JudgeSettings, Question, ask_all, read_cache
from healthai.metrics import normalize_diseases
from healthai.redact import Redactor
from healthai.teacher import checked_api_key
from healthai.teacher_run import Failed


@dataclass
class RecordNames:
    """One record's names: the exact matches, and the names left on each side for the judge."""

    id: int | str
    n_pred: int
    n_ref: int
    exact: int
    pred_left: tuple[str, ...]
    ref_left: tuple[str, ...]

    def questions(self) -> list[Question]:
        """Both orders, or none when one side has nothing left to match."""
        if not self.pred_left or not self.ref_left:
            return []
        return [Question(self.id, self.pred_left, self.ref_left), Question(self.id, self.ref_left, self.pred_left)]


def record_names(refs: Mapping[str, Any], preds: Mapping[str, Any]) -> list[RecordNames]:
    """Per reference record (``refs``/``preds`` as :func:`healthai.evaluate.score` keys them; a missing prediction is
    empty), its names split into exact matches and what is left."""
    out = []
    for key, ref in refs.items():
        pred = preds.get(key)
        p, r = normalize_diseases(pred.diseases if pred is not None else ""), normalize_diseases(ref.diseases)
        exact = set(p) & set(r)
        out.append(RecordNames(ref.id, len(p), len(r), len(exact), tuple(x for x in p if x not in exact),
                               tuple(x for x in r if x not in exact)))  # fmt: skip
    return out


def one_to_one(pairs: set[tuple[int, int]], n_a: int, n_b: int) -> list[tuple[int, int]]:
    """A largest set of ``pairs`` that uses each index at most once on each side (scipy's Hopcroft-Karp)."""
    if not pairs:
        return []
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    rows, cols = zip(*sorted(pairs))
    graph = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_a, n_b))
    match = maximum_bipartite_matching(graph, perm_type="column")  # match[i]: the column row i takes, or -1
    return [(i, int(j)) for i, j in enumerate(match) if j >= 0]


@dataclass
class Tally:
    """What the section counts while going through the records."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    pairs_judged: int = 0
    pairs_agreed: int = 0
    both_orders: int = 0
    one_order: int = 0
    matches: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)


def _score_record(r: RecordNames, model: str, answers: Mapping[str, frozenset[tuple[int, int]]],
                  failures: Mapping[str, Failed], stopped: Optional[str], tally: Tally) -> None:  # fmt: skip
    """Add one record to ``tally``: its exact matches, plus the judge's agreed pairs when both orders answered."""
    matched = r.exact
    questions = r.questions()
    if questions:
        keys = [q.key(model) for q in questions]
        if all(k in answers for k in keys):
            forward = set(answers[keys[0]])
            backward = {(i, j) for j, i in answers[keys[1]]}
            agreed = forward & backward
            tally.pairs_judged += len(r.pred_left) * len(r.ref_left)
            tally.pairs_agreed += len(r.pred_left) * len(r.ref_left) - len(forward ^ backward)
            tally.both_orders += len(agreed)
            tally.one_order += len(forward ^ backward)
            chosen = one_to_one(agreed, len(r.pred_left), len(r.ref_left))
            matched += len(chosen)
            tally.matches += [{"id": r.id, "predicted": r.pred_left[i], "reference": r.ref_left[j]} for i, j in chosen]
        else:
            why = [failures[k].reason for k in keys if k in failures]
            row: dict[str, Any] = {"id": r.id, "reason": why[0] if why else f"not asked: {stopped or 'run stopped'}"}
            raws = [failures[k].raw for k in keys if k in failures and failures[k].raw is not None]
            if raws:
                row["raw"] = raws[0]
            tally.failed.append(row)
    tally.tp += matched
    tally.fp += r.n_pred - matched
    tally.fn += r.n_ref - matched


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Micro precision / recall / F1, 0 where undefined (as :class:`~healthai.metrics.DiseaseF1` reports them)."""
    return {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0}  # fmt: skip


def judge_section(refs: Mapping[str, Any], preds: Mapping[str, Any], settings: JudgeSettings,
                  api_key: Optional[str] = None) -> dict[str, Any]:  # fmt: skip
    """The report's ``disease_judge`` section, asking the judge what the cache does not hold yet (see the module's
    docstring). ``api_key`` defaults to the environment's (:func:`~healthai.teacher.checked_api_key`)."""
    api_key = checked_api_key(api_key)
    redactor = Redactor(api_key)
    records = record_names(refs, preds)
    questions = [q for r in records for q in r.questions()]
    with redactor.guard():
        answers = read_cache(settings.cache)
        cached = sum(q.key(settings.model) in answers for q in questions)
        run = asyncio.run(ask_all(settings, api_key, redactor, questions, answers))
        tally = Tally()
        for r in records:
            _score_record(r, settings.model, answers, run.failures, run.state.aborted, tally)
    section = {
        "label": "judge: a second opinion, not the headline",
        "model": settings.model,
        **_prf(tally.tp, tally.fp, tally.fn),
        "tp": tally.tp, "fp": tally.fp, "fn": tally.fn,
        # The share of (predicted, reference) name pairs both orders gave the same verdict; null when none was asked.
        "agreement": tally.pairs_agreed / tally.pairs_judged if tally.pairs_judged else None,
        "pairs_judged": tally.pairs_judged,
        "pairs_matched_both_orders": tally.both_orders,
        "pairs_matched_one_order_only": tally.one_order,
        "questions": len(questions),
        "cached": cached,
        "asked": run.asked,
        "cache": str(settings.cache),
        "stopped": run.state.aborted,
        "signal": run.state.signal,
        "matches": tally.matches,
        "failed": tally.failed,
    }  # fmt: skip
    return json.loads(redactor(json.dumps(section, ensure_ascii=False)))


def judge_table(section: Mapping[str, Any]) -> str:
    """The judge's section as printed: its own labelled block, under the exact and normalised scores."""
    agreement = section["agreement"]
    lines = [f"disease, judged by {section['model']} (a second opinion, not the headline)",
             *(f"  {k:<10} {section[k]:.4f}" for k in ("precision", "recall", "f1")),
             "  agreement of the two orders: " + ("n/a (nothing asked)" if agreement is None else
                                                  f"{agreement:.4f} over {section['pairs_judged']} name pairs"),
             f"  questions {section['questions']}: {section['cached']} from the cache, {section['asked']} asked "
             f"this run ({section['cache']})"]  # fmt: skip
    lines += [f"  judged match, record {m['id']}: {m['predicted']} = {m['reference']}" for m in section["matches"]]
    if section["failed"]:
        lines.append(f"  FAILED: {len(section['failed'])} records scored by exact matches only; rerun to ask again")
        lines += [f"  failed, record {f['id']}: {f['reason']}" for f in section["failed"]]
    return "\n".join(lines)


def check_judged(section: Optional[Mapping[str, Any]]) -> None:
    """Exit (after the report is written) when any record's judgement failed: the judge's numbers are then
    incomplete, and a rerun asks the failed questions again. Status 1, or 128 + the signal after SIGTERM / SIGINT
    (the shell's convention, as ``label``)."""
    if section and section["failed"]:
        print(f"judge: {len(section['failed'])} record(s) could not be judged (listed in the report's disease_judge; "
              f"they count by exact matches only); rerun the same command to ask them again", file=sys.stderr)
        raise SystemExit(128 + section["signal"] if section["signal"] else 1)
