"""``python -m healthai compare``: several predictions files on the same references, side by side, and for each pair
the difference in disease F1 with a paired bootstrap confidence interval — is the tuned adapter better than the
zero-shot base, where, and by how much, or is it noise?

Each file is scored by :func:`healthai.evaluate.score` (the rules of ``evaluate``: records joined by id, a record
missing from a file counts as an empty answer there and is listed, never dropped). The interval resamples the reference
records with replacement, the same records for both systems of a pair (paired), and recomputes the micro F1 difference
on each resample (:func:`scipy.stats.bootstrap`, percentile interval: it stays defined when every resample gives the
same difference, e.g. two identical files, where BCa's acceleration is 0/0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from healthai.breakdown import DEFAULT_LENGTH_EDGES, DEFAULT_TOP_DIAGNOSES, RecordScore, format_table
from healthai.errors import ConfigError, NonNegativeInt, OpenUnitInterval, PositiveInt, ResampleCount, UserError
from healthai.errors import check_declared, check_output, require_extra
from healthai.evaluate import _preview, check_breakdown_options, metric_keys, read_references, score, write_json
from healthai.normalized_report import normalized_records, normalized_section
from healthai.paths import check_input_file, check_writable, naming
from healthai.synonyms import normalizer_from

METHOD = "paired bootstrap over records, percentile interval (scipy.stats.bootstrap)"


@dataclass
class SystemSpec:
    """One system to compare: its display name and its predictions file."""

    name: str
    path: Path


def parse_systems(specs: Sequence[str]) -> list[SystemSpec]:
    """``PATH`` (named by the file's stem) or ``NAME=PATH`` each; names must differ and there must be two or more."""
    systems = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        # "a=b.jsonl" names a system; a path that itself holds "=" after a folder ("runs/lr=2e-4/p.jsonl") does not.
        if not sep or "/" in name or os.sep in name:
            name, path = Path(spec).stem, spec
        if not name.strip() or not path.strip():
            raise ConfigError(f"systems: {spec!r} is not PATH or NAME=PATH")
        systems.append(SystemSpec(name.strip(), Path(path)))
    if len(systems) < 2:
        raise ConfigError(f"compare needs two or more predictions files, got {len(systems)}")
    names = [s.name for s in systems]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"two systems are named {repeated[0]!r}: name them with NAME=PATH")
    return systems


def check_outputs_are_not_inputs(inputs: dict[str, Path], outputs: dict[str, Optional[Path]]) -> None:
    """The one output rule (:func:`healthai.errors.check_output`) for each output: never an input, never an earlier
    output, never a folder, never where the system refuses to write (#29 item 8). Keys are how the user named each
    path (an option, or a system's name)."""
    earlier: dict[str, Any] = dict(inputs)
    for option, out in outputs.items():
        if out is not None:
            check_output(option, out, earlier)
            check_writable(option, out)
            earlier[option] = out


def _counts(records: Sequence[RecordScore]) -> np.ndarray:
    """Per-record (TP, FP, FN), shape (3, n)."""
    return np.array([[len(r.matched), len(r.extra), len(r.missed)] for r in records], dtype=np.int64).T.reshape(3, -1)


def _micro_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, axis: int = -1) -> np.ndarray:
    tp, fp, fn = tp.sum(axis=axis), fp.sum(axis=axis), fn.sum(axis=axis)
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)  # 0 when undefined, as DiseaseF1


def f1_difference_interval(
    a: Sequence[RecordScore], b: Sequence[RecordScore], resamples: int, seed: int, confidence: float
) -> tuple[float, float, float]:
    """``(F1(b) - F1(a), low, high)``: the micro disease-F1 difference on the records and its paired bootstrap
    interval. ``a[i]`` and ``b[i]`` must be the same reference record."""
    from scipy.stats import bootstrap

    ca, cb = _counts(a), _counts(b)
    difference = float(_micro_f1(*cb) - _micro_f1(*ca))
    if len(a) < 2:  # one record: every resample is that record
        return difference, difference, difference

    def statistic(tpa, fpa, fna, tpb, fpb, fnb, axis=-1):
        return _micro_f1(tpb, fpb, fnb, axis) - _micro_f1(tpa, fpa, fna, axis)

    result = bootstrap(
        (*ca, *cb), statistic, paired=True, vectorized=True, n_resamples=resamples, confidence_level=confidence,
        method="percentile", rng=np.random.default_rng(seed), batch=max(1, 2_000_000 // len(a)),
    )  # fmt: skip
    low, high = result.confidence_interval
    return difference, float(low), float(high)


def compare_pair(
    name_a: str, a: Sequence[RecordScore], name_b: str, b: Sequence[RecordScore], resamples: int, seed: int,
    confidence: float,
) -> dict[str, Any]:  # fmt: skip
    """One pair's entry of the report: the F1 difference ``b - a`` with its interval, and the records right in one
    system and wrong in the other (right: the predicted diagnoses are exactly the reference's)."""
    difference, low, high = f1_difference_interval(a, b, resamples, seed, confidence)
    return {
        "a": name_a,
        "b": name_b,
        "difference": difference,
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
        "excludes_zero": bool(low > 0 or high < 0),
        "resamples": resamples,
        "seed": seed,
        "n": len(a),
        "method": METHOD,
        "b_right_a_wrong": [rb.id for ra, rb in zip(a, b) if rb.right and not ra.right],
        "a_right_b_wrong": [ra.id for ra, rb in zip(a, b) if ra.right and not rb.right],
    }


def _signed(x: float) -> str:
    return f"{x:+.4f}"


def pair_summary(pair: dict[str, Any]) -> str:
    """Two lines for a person: the difference with its interval and what it means, and the records that differ."""
    verdict = (
        f"{pair['b'] if pair['difference'] > 0 else pair['a']} is better beyond the noise of this test set"
        if pair["excludes_zero"]
        else "the interval includes 0: no evidence of a difference on this test set"
    )
    return (
        f"{pair['b']} - {pair['a']}: disease F1 {_signed(pair['difference'])}, {pair['confidence']:.0%} CI "
        f"[{_signed(pair['ci_low'])}, {_signed(pair['ci_high'])}] (paired bootstrap, {pair['resamples']} resamples of "
        f"{pair['n']} records, seed {pair['seed']}): {verdict}\n"
        f"  right in {pair['b']} only: {len(pair['b_right_a_wrong'])} records"
        + (f" ({_preview(pair['b_right_a_wrong'])})" if pair["b_right_a_wrong"] else "")
        + f"; right in {pair['a']} only: {len(pair['a_right_b_wrong'])} records"
        + (f" ({_preview(pair['a_right_b_wrong'])})" if pair["a_right_b_wrong"] else "")
    )


COUNT_KEYS = ("n", "n_predictions", "missing", "unknown")
"""The report's counts shown under the metrics (every metric of :func:`healthai.metrics.answer_metrics`)."""


def side_by_side(names: list[str], reports: list[dict[str, Any]]) -> str:
    """The metrics and breakdowns of every system as readable tables, one column per system."""

    def value(v: Any) -> Any:
        return len(v) if isinstance(v, list) else v

    keys = [*metric_keys(), *COUNT_KEYS]
    parts = [format_table(["metric", *names], [[k, *(value(r[k]) for r in reports)] for k in keys])]
    first = reports[0]["breakdown"]
    rows = [[d["diagnosis"], d["support"], *(r["breakdown"]["diagnoses"][i]["f1"] for r in reports)]
            for i, d in enumerate(first["diagnoses"])]  # fmt: skip
    parts.append(f"disease F1 per diagnosis (the {len(rows)} most frequent in the references)\n"
                 + format_table(["diagnosis", "support", *names], rows))  # fmt: skip
    statuses = list(dict.fromkeys(s for r in reports for s in r["breakdown"]["parse_status"]))
    rows = [[s, *(f"{r['breakdown']['parse_status'][s]['n']} / {r['breakdown']['parse_status'][s]['f1']:.4f}"
                  if s in r["breakdown"]["parse_status"] else "0" for r in reports)] for s in statuses]  # fmt: skip
    parts.append("records / disease F1 per parse_status\n" + format_table(["parse_status", *names], rows))
    rows = [[b["bucket"], b["n"], *(r["breakdown"]["case_length_chars"][i]["f1"] for r in reports)]
            for i, b in enumerate(first["case_length_chars"])]  # fmt: skip
    parts.append("disease F1 per case length (characters)\n" + format_table(["length", "records", *names], rows))
    return "\n\n".join(parts)


def compare(
    systems: list[str],
    references: Path,
    report: Optional[Path] = None,
    html: Optional[Path] = None,
    resamples: ResampleCount = 10000,
    seed: NonNegativeInt = 0,
    confidence: OpenUnitInterval = 0.95,
    top_diagnoses: PositiveInt = DEFAULT_TOP_DIAGNOSES,
    length_edges: list[PositiveInt] = list(DEFAULT_LENGTH_EDGES),
    examples: NonNegativeInt = 20,
    synonyms: Optional[Path] = None,
    allow_empty_references: bool = False,
) -> dict[str, Any]:
    """Compare predictions files on the same references, side by side, with bootstrap intervals for F1 differences.

    Metrics side by side, and for each pair the disease-F1 difference with a paired bootstrap confidence interval and
    the records right in one and wrong in the other. ``python -m healthai compare --references REF A.jsonl B.jsonl``
    (the files may come before or after the options).
    Each file is scored as ``evaluate`` scores it, breakdowns included; a record missing from a file counts as an
    empty answer in that file (in its metrics and in the interval) and is listed under its ``missing``. For each pair
    (in the order given) the difference is the later file's F1 minus the earlier one's, so list the baseline first.

    Args:
        systems: Predictions files to compare: ``PATH`` (named by the file's stem) or ``NAME=PATH``, two or more;
            given as bare words on the command line (``compare --references REF zero-shot=A.jsonl tuned=B.jsonl``).
        references: JSONL of reference rows ``{"id", "diseases", ...}``, as for evaluate.
        report: Write the comparison (every system's evaluate report and every pair) here as JSON.
        html: Write a self-contained HTML report here (summary, per-diagnosis F1 chart, F1 differences with their
            intervals, example records); needs the ``report`` extra (matplotlib).
        resamples: Bootstrap resamples per pair.
        seed: Seed of the bootstrap's random generator (the same seed gives the same interval).
        confidence: Confidence level of the interval.
        top_diagnoses: How many of the most frequent reference diagnoses the per-diagnosis breakdown lists.
        length_edges: Case-length bucket edges, in characters, increasing.
        examples: How many example records the HTML report shows (records the systems disagree on first).
        synonyms: The synonym table of the normalised match (docs/evaluate.md): each system's report gets
            ``disease_normalized`` and each pair a ``normalized`` difference with its own bootstrap interval (without
            it, the default qualifier rules alone).
        allow_empty_references: Score a reference whose ``diseases`` is empty as "no diagnosis" instead of stopping
            at its line, as for evaluate.

    Returns:
        ``{"references", "systems": {name: evaluate's report}, "pairs": [...]}``; each pair has ``a``, ``b``,
        ``difference`` (F1 of b minus a), ``ci_low``, ``ci_high``, ``excludes_zero``, ``b_right_a_wrong``,
        ``a_right_b_wrong`` and the bootstrap settings.
    """
    specs = parse_systems(systems)
    check_declared(compare, locals())  # the CLI checks these too; this is for Python callers
    check_breakdown_options(top_diagnoses, length_edges)
    inputs = {"--references": Path(references), **{f"system {s.name!r}": s.path for s in specs}}
    check_outputs_are_not_inputs(inputs, {"--report": report, "--html": html})
    if html is not None:
        require_extra("matplotlib", extra="report", needed_by="--html")
    for s in specs:
        if not s.path.exists() and not s.path.is_symlink():
            raise UserError(f"system {s.name!r}: no such predictions file: {s.path}")
        check_input_file(s.path)  # a folder, a FIFO, /dev/null or a link loop, said as what it is (#29 item 9)

    normalizer = normalizer_from(synonyms)
    refs = read_references(Path(references), allow_empty=allow_empty_references)
    scored = [score(s.path, references, refs, top_diagnoses, length_edges) for s in specs]
    normalized = [normalized_records(refs, sc.preds.rows, normalizer) for sc in scored]
    pairs = []
    for i, j in combinations(range(len(specs)), 2):
        pair = compare_pair(specs[i].name, scored[i].records, specs[j].name, scored[j].records, resamples, seed,
                            confidence)  # fmt: skip
        interval = f1_difference_interval(normalized[i], normalized[j], resamples, seed, confidence)
        pair["normalized"] = dict(zip(("difference", "ci_low", "ci_high"), interval))
        pairs.append(pair)
    for sc in scored:
        sc.report["disease_normalized"] = normalized_section(refs, sc.preds.rows, normalizer)
    result = {
        "references": str(references),
        "systems": {s.name: sc.report for s, sc in zip(specs, scored)},
        "pairs": pairs,
    }

    names = [s.name for s in specs]
    print(side_by_side(names, [sc.report for sc in scored]))
    print()
    for s, sc in zip(specs, scored):
        for what in ("missing", "unknown"):
            if sc.report[what]:
                print(f"{s.name}: {what} ids: {_preview(sc.report[what])}")
    for pair in pairs:
        print(pair_summary(pair))
        n = pair["normalized"]
        print(f"  normalised F1 difference (synonyms {normalizer.fingerprint()}): {_signed(n['difference'])} "
              f"[{_signed(n['ci_low'])}, {_signed(n['ci_high'])}]")
    if report is not None:
        with naming(report):  # a full disk says which file (#29 item 8)
            write_json(Path(report), result)
    if html is not None:
        from healthai.report import SystemResult, write_html

        results = [SystemResult(s.name, str(s.path), sc.report, sc.records) for s, sc in zip(specs, scored)]
        with naming(html):
            write_html(Path(html), results, pairs, str(references), examples)
        print(f"html report: {html}")
    return result
