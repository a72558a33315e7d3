"""Normalised diagnosis matching: a user's synonym table plus editable qualifier rules, never a similarity guess.

A predicted name matches a reference name *normally* when both reach the same canonical name (:meth:`Normalizer.
canonical`): first the qualifier rules of :data:`DEFAULT_RULES` strip words that do not change the disease for
scoring (a grade ``(2级)``, ``原发性``, ``伴…控制不佳``), then the synonym table maps an alias to its canonical name.
Names one character apart are often other diseases (``1型糖尿病``/``2型糖尿病``, ``肺炎``/``肺癌``), so nothing here
measures similarity: a pair matches only through a rule or a table line a person can read (docs/evaluate.md).

:func:`match_normalized` is one-to-one and counts every exact match first, so normalised F1 ≥ exact F1 on any input.
The table is a UTF-8 file: TSV ``canonical<TAB>alias`` per line, or JSON ``{canonical: [aliases]}``; a malformed
line or an alias given to two canonical names is refused with an :class:`~healthai.errors.InputError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from healthai.errors import InputError


class QualifierRule(NamedTuple):
    """One qualifier that does not change the disease for scoring: ``pattern`` is deleted from a name."""

    name: str
    pattern: str
    """A regular expression (Python ``re``) matched against the NFKC name; each match is deleted."""
    example: str
    """A name the rule shortens, ``before -> after``, as the docs show it."""


DEFAULT_RULES: tuple[QualifierRule, ...] = (
    # A grade or stage in brackets or trailing: 高血压(2级), 高血压3级. A bare digit before 型 (2型糖尿病) is not a grade.
    QualifierRule("grade", r"[(（]?\s*[0-9一二三四]+\s*级\s*[)）]?$", "高血压(2级) -> 高血压"),
    # A cardiovascular risk group: 高血压2级(极高危), 高血压很高危.
    QualifierRule("risk", r"[(（]?\s*(?:低|中|高|很高|极高)危\s*[)）]?$", "高血压(极高危) -> 高血压"),
    # 原发性 before a name: essential hypertension is what 高血压 means by default (继发性 is kept: another disease).
    QualifierRule("primary", r"^原发性", "原发性高血压 -> 高血压"),
    # 伴…控制不佳/不良/欠佳: how well a disease is controlled, not which disease.
    QualifierRule("control", r"伴[^伴]{0,8}控制(?:不佳|不良|欠佳|差)$", "2型糖尿病伴血糖控制不佳 -> 2型糖尿病"),
    # 病 after 血压: 高血压病 is 高血压 (低血压 stays 低血压: only the 病 goes).
    QualifierRule("disease_suffix", r"(?<=血压)病$", "高血压病 -> 高血压"),
)
"""The qualifier rules applied by default, in order (the whole list repeats until no rule changes the name)."""


def _nfkc(name: str) -> str:
    return unicodedata.normalize("NFKC", name).strip()


class Normalizer:
    """Maps a disease name to its canonical name through qualifier ``rules`` and a synonym ``table``.

    ``table`` maps alias → canonical (both NFKC); an alias is looked up as written and after the rules.
    """

    def __init__(self, table: Optional[dict[str, str]] = None,
                 rules: Sequence[QualifierRule] = DEFAULT_RULES) -> None:
        self.table = dict(table or {})
        self.rules = tuple(rules)
        self._compiled = [re.compile(rule.pattern) for rule in self.rules]
        self._cache: dict[str, str] = {}

    def strip_qualifiers(self, name: str) -> str:
        """``name`` with every qualifier rule applied until none changes it (never to an empty name)."""
        while True:
            before = name
            for pattern in self._compiled:
                shorter = pattern.sub("", name).strip()
                name = shorter or name
            if name == before:
                return name

    def canonical(self, name: str) -> str:
        """The canonical name: the table's entry for ``name`` or for its stripped form, else the stripped form."""
        hit = self._cache.get(name)
        if hit is None:
            name_n = _nfkc(name)
            hit = self.table.get(name_n)
            if hit is None:
                stripped = self.strip_qualifiers(name_n)
                hit = self.table.get(stripped, stripped)
            self._cache[name] = hit
        return hit

    def fingerprint(self) -> str:
        """A short hash of the table and the rules: two reports scored alike carry the same one."""
        blob = json.dumps({"table": sorted(self.table.items()), "rules": [list(r[:2]) for r in self.rules]},
                          ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class NormalizedMatch(NamedTuple):
    """One record's one-to-one matching: exact pairs first, then the pairs only the normalisation made."""

    matched: list[str]
    """Predicted names matched exactly or normally (true positives), in prediction order."""
    missed: list[str]
    """Reference names left unmatched (false negatives), in reference order."""
    extra: list[str]
    """Predicted names left unmatched (false positives), in prediction order."""
    normalized_pairs: list[tuple[str, str]]
    """``(predicted, reference)`` pairs that only the normalised rule matched, for a person to audit."""


def match_normalized(pred_items: Sequence[str], target_items: Sequence[str], normalizer: Normalizer) -> NormalizedMatch:
    """Match two lists of normalised names one to one: each name is used at most once; exact equality first, then
    equal canonical names, each predicted name (in order) taking the first free reference name with its canonical."""
    target_set = set(target_items)
    exact = {p for p in pred_items if p in target_set}
    free_targets = [t for t in target_items if t not in exact]
    pairs: list[tuple[str, str]] = []
    by_pred: dict[str, str] = {}
    for p in pred_items:
        if p in exact:
            continue
        cp = normalizer.canonical(p)
        for i, t in enumerate(free_targets):
            if normalizer.canonical(t) == cp:
                pairs.append((p, t))
                by_pred[p] = t
                del free_targets[i]
                break
    return NormalizedMatch(
        matched=[p for p in pred_items if p in exact or p in by_pred],
        missed=free_targets,
        extra=[p for p in pred_items if p not in exact and p not in by_pred],
        normalized_pairs=pairs,
    )


def _add(table: dict[str, str], alias: str, canonical: str, where: str) -> None:
    alias, canonical = _nfkc(alias), _nfkc(canonical)
    if not alias or not canonical:
        raise InputError(f"{where}: empty canonical name or alias")
    for name in (alias, canonical):
        known = table.get(name)
        if known is not None and known != canonical:
            raise InputError(f"{where}: {name!r} is already a name of {known!r}, not of {canonical!r}")
    table[canonical] = canonical
    table[alias] = canonical


def load_synonyms(path: str | Path) -> dict[str, str]:
    """Read a synonym file (``.json``: ``{canonical: [aliases]}``; otherwise TSV ``canonical<TAB>alias`` per line,
    blank lines and ``#`` comments skipped) into alias → canonical; refuses a bad file in one line naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the synonym file ({exc})") from exc
    table: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from exc
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected an object {{canonical: [aliases]}}")
        for canonical, aliases in data.items():
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise InputError(f"{path}: {canonical!r} must map to a list of alias strings")
            for alias in aliases:
                _add(table, alias, canonical, f"{path}: {canonical!r}")
        return table
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise InputError(f"{path}:{lineno}: expected 'canonical<TAB>alias', got {len(fields)} field(s): {line!r}")
        _add(table, fields[1], fields[0], f"{path}:{lineno}")
    return table


def normalizer_from(path: Optional[str | Path]) -> Normalizer:
    """The :class:`Normalizer` of a synonym file (``None``: no table, the default rules only)."""
    return Normalizer(load_synonyms(path) if path else None)
