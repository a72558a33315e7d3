"""The HTML report of ``evaluate --html`` and ``compare --html``: one self-contained file a person can open anywhere.

Everything is inline — the styles, and the charts as SVG drawn by matplotlib (the ``report`` extra) — so the page
needs no network and no other file. Text in the charts stays text (``svg.fonttype: none``): the browser draws the
Chinese diagnosis names with its own fonts, and the file stays small.
"""

from __future__ import annotations

import html
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from healthai.breakdown import RecordScore, format_value

CASE_START_CHARS = 80
"""How much of a case text the example table shows."""

FONTS = ["Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "Microsoft YaHei",
         "PingFang SC", "DejaVu Sans", "sans-serif"]  # fmt: skip
"""Font families the page and the charts ask for, Chinese-capable first."""


@dataclass
class SystemResult:
    """One scored predictions file, as the report shows it."""

    name: str
    path: str
    report: dict[str, Any]
    """evaluate's report (metrics and breakdowns)."""
    records: list[RecordScore]
    """Each reference record's score, in reference order (the same order for every system)."""


def _svg(fig) -> str:
    """The figure as an inline ``<svg>`` element (no XML prolog, no date: the same data gives the same bytes)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    return Figure(figsize=(width, height), layout="constrained")


class _Charts:
    """matplotlib settings for the report's charts, and quiet about fonts it lacks (the browser draws the text)."""

    def __enter__(self):
        import matplotlib

        self._rc = matplotlib.rc_context(
            {"svg.fonttype": "none", "svg.hashsalt": "healthai", "font.family": "sans-serif",
             "font.sans-serif": FONTS[:-1], "font.size": 10, "axes.spines.top": False, "axes.spines.right": False}
        )  # fmt: skip
        self._rc.__enter__()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from font")
        self._log = logging.getLogger("matplotlib.font_manager")
        self._level = self._log.level
        self._log.setLevel(logging.ERROR)  # "findfont: Font family ... not found"
        return self

    def __exit__(self, *exc):
        self._log.setLevel(self._level)
        self._warnings.__exit__(*exc)
        self._rc.__exit__(*exc)


COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def diagnosis_f1_chart(systems: Sequence[SystemResult]) -> str:
    """Grouped horizontal bars: disease F1 of each system for each of the most frequent reference diagnoses."""
    rows = systems[0].report["breakdown"]["diagnoses"]
    if not rows:
        return "<p>No reference diagnoses.</p>"
    labels = [f"{r['diagnosis']} ({r['support']})" for r in rows]
    n, k = len(rows), len(systems)
    bar = 0.8 / k
    with _Charts():
        fig = _figure(7.5, 0.9 + n * (0.22 * k + 0.12))
        ax = fig.add_subplot()
        for j, system in enumerate(systems):
            f1 = [r["f1"] for r in system.report["breakdown"]["diagnoses"]]
            ys = [i + (j - (k - 1) / 2) * bar for i in range(n)]
            bars = ax.barh(ys, f1, height=bar, color=COLORS[j % len(COLORS)], label=system.name)
            ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=7, color="#555555")  # an F1 of 0 shows too
        ax.set_yticks(range(n), labels)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.06)  # room for the label of an F1 of 1
        ax.set_xlabel("disease F1 (support: reference records holding the diagnosis)")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right", frameon=False, fontsize=9)
        return _svg(fig)


def difference_chart(pairs: Sequence[dict[str, Any]]) -> str:
    """Each pair's F1 difference as a point with its confidence interval, against a line at 0."""
    with _Charts():
        fig = _figure(7.5, 0.8 + 0.45 * len(pairs))
        ax = fig.add_subplot()
        for i, p in enumerate(pairs):
            color = "#2a7a2a" if p["excludes_zero"] else "#555555"
            err = [[p["difference"] - p["ci_low"]], [p["ci_high"] - p["difference"]]]
            ax.errorbar([p["difference"]], [i], xerr=err, fmt="o", color=color, capsize=4)
        ax.axvline(0, color="#c44e52", linewidth=1)
        ax.set_yticks(range(len(pairs)), [f"{p['b']} − {p['a']}" for p in pairs])
        ax.invert_yaxis()
        ax.set_ylim(len(pairs) - 0.5, -0.5)
        lo = min(min(p["ci_low"] for p in pairs), 0)
        hi = max(max(p["ci_high"] for p in pairs), 0)
        pad = max(0.02, 0.1 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_xlabel(f"disease F1 difference, {pairs[0]['confidence']:.0%} paired bootstrap interval")
        ax.grid(axis="x", alpha=0.3)
        return _svg(fig)


def pick_examples(systems: Sequence[SystemResult], limit: int) -> list[int]:
    """Indices of the records to show: those the systems disagree on (right in one, wrong in another) first, then
    those every system gets wrong, then the rest; reference order within each group."""
    n = len(systems[0].records)

    def group(i: int) -> int:
        right = {s.records[i].right for s in systems}
        return 0 if len(right) > 1 else (1 if right == {False} else 2)

    return sorted(range(n), key=lambda i: (group(i), i))[:limit]


def _e(value: Any) -> str:
    return html.escape(str(value))


def _answer_cell(r: RecordScore) -> str:
    if r.parse_status == "missing":
        return '<span class="status">no prediction</span>'
    names = [f'<span class="m">{_e(x)}</span>' for x in r.matched]
    names += [f'<span class="x">{_e(x)}</span>' for x in r.extra]
    missed = f'<div class="ms">missed: {"、".join(_e(x) for x in r.missed)}</div>' if r.missed else ""
    status = f' <span class="status">{_e(r.parse_status)}</span>' if r.parse_status != "ok" else ""
    mark = '<span class="ok">✓</span> ' if r.right else ""
    return mark + (" ".join(names) or '<span class="status">(none)</span>') + status + missed


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


METRIC_LABELS = {"disease_f1": "disease F1", "disease_precision": "disease precision",
                 "disease_recall": "disease recall", "json_valid_rate": "JSON valid (strict)",
                 "truncated_rate": "truncated (budget closed)", "reason_rougeL": "reason ROUGE-L"}  # fmt: skip
"""How the summary names a report metric; one not listed (a new metric) is shown under its report key."""
COUNT_LABELS = [("n", "reference records"), ("n_predictions", "records predicted"), ("missing", "missing"),
                ("unknown", "unknown ids")]  # fmt: skip


def normalized_rows(systems: Sequence[SystemResult]) -> list[list[str]]:
    """Summary rows of the normalised match (docs/evaluate.md), labelled with the table's fingerprint; none when a
    report has no ``disease_normalized``."""
    if not all("disease_normalized" in s.report for s in systems):
        return []
    fingerprint = systems[0].report["disease_normalized"]["fingerprint"]
    return [[f"disease {k} (normalised, synonyms {_e(fingerprint)})",
             *(format_value(s.report["disease_normalized"]["normalized"][k]) for s in systems)]
            for k in ("f1", "precision", "recall")]  # fmt: skip


def judge_rows(systems: Sequence[SystemResult]) -> list[list[str]]:
    """Summary rows of the judge's second opinion (docs/evaluate.md), labelled with the judge model, and the
    agreement of its two orders; none when a report has no ``disease_judge``."""
    if not all("disease_judge" in s.report for s in systems):
        return []
    model = systems[0].report["disease_judge"]["model"]
    rows = [[f"disease {k} (judge {_e(model)}, second opinion)",
             *(format_value(s.report["disease_judge"][k]) for s in systems)] for k in ("f1", "precision", "recall")]
    rows.append([f"judge agreement of the two orders ({_e(model)})",
                 *(format_value(s.report["disease_judge"]["agreement"]) for s in systems)])
    rows.append(["records the judge could not judge (exact only)",
                 *(format_value(len(s.report["disease_judge"]["failed"])) for s in systems)])
    return rows  # fmt: skip


def summary_rows() -> list[tuple[str, str]]:
    """``(report key, label)`` of the summary table: disease F1 first, then every other metric of
    :func:`healthai.metrics.answer_metrics` in its order, then the counts."""
    from healthai.evaluate import metric_keys

    keys = sorted(metric_keys(), key=lambda k: k != "disease_f1")  # stable: the others keep their order
    return [(k, METRIC_LABELS.get(k, k)) for k in keys] + COUNT_LABELS

STYLE = """
body { font-family: %s; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
table.num td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
.m { background: #d8f0d8; padding: 0 0.25em; border-radius: 3px; }
.x { background: #f8d8d8; text-decoration: line-through; padding: 0 0.25em; border-radius: 3px; }
.ms { color: #a05a00; font-size: 0.9em; } .status { color: #777; font-size: 0.9em; } .ok { color: #2a7a2a; }
.case { color: #555; max-width: 22em; } .note { color: #555; font-size: 0.92em; }
.better { color: #2a7a2a; font-weight: bold; } svg { max-width: 100%%; height: auto; }
""" % ", ".join(f"'{f}'" if " " in f else f for f in FONTS)


def render_html(
    systems: Sequence[SystemResult], pairs: Sequence[dict[str, Any]], references: str, examples: int
) -> str:
    """The whole page as one string."""
    names = [s.name for s in systems]
    title = "HealthAI evaluation" if len(systems) == 1 else "HealthAI comparison: " + " vs ".join(names)
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="note">references: {_e(references)} · '
             + " · ".join(f"{_e(s.name)}: {_e(s.path)}" for s in systems) + "</p>"]  # fmt: skip

    parts.append("<h2>Summary</h2>")
    rows = [[label, *(format_value(s.report[key]) for s in systems)] for key, label in summary_rows()]
    # The exact disease F1/P/R stay first (the headline); the normalised ones follow them, labelled.
    rows = rows[:3] + normalized_rows(systems) + judge_rows(systems) + rows[3:]
    parts.append(_table(["metric", *map(_e, names)], rows, "num"))
    for s in systems:
        for what in ("missing", "unknown"):
            if s.report[what]:
                ids = ", ".join(map(str, s.report[what][:20])) + (" …" if len(s.report[what]) > 20 else "")
                parts.append(f'<p class="note">{_e(s.name)}: {what} ids: {_e(ids)}</p>')

    if pairs:
        parts.append("<h2>Disease F1 differences</h2>")
        rows = []
        for p in pairs:
            verdict = (f'<span class="better">{_e(p["b"] if p["difference"] > 0 else p["a"])} is better</span>'
                       if p["excludes_zero"] else "the interval includes 0: no evidence of a difference")  # fmt: skip
            differ = (f"{len(p['b_right_a_wrong'])} right only in {_e(p['b'])}, "
                      f"{len(p['a_right_b_wrong'])} right only in {_e(p['a'])}")  # fmt: skip
            rows.append([f"{_e(p['b'])} − {_e(p['a'])}", f"{p['difference']:+.4f}",
                         f"[{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]", verdict, differ])  # fmt: skip
        conf = f"{pairs[0]['confidence']:.0%}"
        parts.append(_table(["pair", "F1 difference", f"{conf} interval", "", "records"], rows))
        parts.append(difference_chart(pairs))
        p = pairs[0]
        parts.append(f'<p class="note">Paired bootstrap over the {p["n"]} reference records ({p["resamples"]} '
                     f'resamples, seed {p["seed"]}, percentile interval): records are resampled with replacement, the '
                     "same ones for both systems, and the micro F1 difference is recomputed on each resample. A record "
                     "missing from a file counts as an empty answer there. “Right”: the predicted diagnoses are "
                     "exactly the reference's.</p>")  # fmt: skip

    parts.append("<h2>Disease F1 per diagnosis</h2>")
    parts.append(diagnosis_f1_chart(systems))
    b0 = systems[0].report["breakdown"]
    rows = [[_e(d["diagnosis"]), str(d["support"]),
             *(f"{s.report['breakdown']['diagnoses'][i]['precision']:.2f} / "
               f"{s.report['breakdown']['diagnoses'][i]['recall']:.2f} / "
               f"<b>{s.report['breakdown']['diagnoses'][i]['f1']:.2f}</b>" for s in systems)]
            for i, d in enumerate(b0["diagnoses"])]  # fmt: skip
    parts.append(_table(["diagnosis", "support", *(f"{_e(n)}: P / R / <b>F1</b>" for n in names)], rows, "num"))

    parts.append("<h2>By parse status and by case length</h2>")
    statuses = list(dict.fromkeys(k for s in systems for k in s.report["breakdown"]["parse_status"]))
    rows = [[_e(k), *(f"{g['n']} records, F1 {g['f1']:.4f}" if (g := s.report["breakdown"]["parse_status"].get(k))
                      else "0 records" for s in systems)] for k in statuses]  # fmt: skip
    parts.append(_table(["parse_status", *map(_e, names)], rows, "num"))
    rows = [[_e(b["bucket"]), str(b["n"]),
             *(f"{s.report['breakdown']['case_length_chars'][i]['f1']:.4f}" for s in systems)]
            for i, b in enumerate(b0["case_length_chars"])]  # fmt: skip
    parts.append(_table(["case length (characters)", "records", *(f"{_e(n)}: F1" for n in names)], rows, "num"))

    chosen = pick_examples(systems, examples)
    if chosen:
        parts.append("<h2>Example records</h2>")
        order = ("records the systems disagree on first, then those all get wrong" if len(systems) > 1
                 else "wrong answers first")  # fmt: skip
        parts.append(f'<p class="note">{len(chosen)} of {len(systems[0].records)} records ({order}). '
                     '<span class="m">matched</span> <span class="x">extra</span> '
                     '<span class="ms">missed</span> · ✓ exactly right</p>')  # fmt: skip
        rows = []
        for i in chosen:
            r0 = systems[0].records[i]
            case = r0.case_text or ""
            start = case[:CASE_START_CHARS] + ("…" if len(case) > CASE_START_CHARS else "")
            rows.append([_e(r0.id), f'<div class="case">{_e(start)}</div>', _e(r0.reference),
                         *(_answer_cell(s.records[i]) for s in systems)])  # fmt: skip
        parts.append(_table(["id", "case start", "reference", *map(_e, names)], rows))

    return (f'<!DOCTYPE html>\n<html lang="zh"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")  # fmt: skip


def write_html(
    path: Path, systems: Sequence[SystemResult], pairs: Sequence[dict[str, Any]], references: str, examples: int
) -> None:
    """Write the report page to ``path`` (folders created), atomically: a failed write leaves the previous page."""
    from healthai.atomic import write_text

    write_text(path, render_html(systems, pairs, references, examples))
