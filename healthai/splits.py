"""Which records validate and which train: the rules that keep validation records out of training (#29 item 7).

A validation record that also trains scores the adapter on what it memorised, and nothing on the page says so. So an
id present in both ``data.train_file`` and ``data.val_file`` is an error naming the count and one id, unless the user
says what to do with it (``data.val_overlap``: ``drop`` it from training, or ``keep`` it, each with a line saying so).
Ids are compared by the one id rule (:func:`healthai.records.id_key`: ``5`` and ``"5"`` are one record).
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

from healthai.errors import ConfigError, InputError
from healthai.records import id_key

log = logging.getLogger(__name__)

ValOverlap = Literal["error", "drop", "keep"]

DEFAULT_VAL_FRACTION = 0.05
"""The share of ``train_file`` held out when neither ``val_file`` nor ``val_fraction`` is given."""


def val_fraction_in_use(val_fraction: Optional[float], val_file: Optional[str]) -> float:
    """The validation share of ``train_file``: ``val_fraction`` as given, :data:`DEFAULT_VAL_FRACTION` when it is not,
    0 beside a ``val_file``. Both given is refused: one of them would be silently ignored."""
    if val_file is None:
        return DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    if val_fraction is not None:
        raise ConfigError(f"data.val_fraction {val_fraction} and data.val_file {val_file} both say what validates; "
                          "set only one (data.val_fraction null with a val_file)")  # fmt: skip
    return 0.0


def separate_validation(train: list[dict], val: list[dict], train_file: str, val_file: str,
                        overlap: ValOverlap) -> list[dict]:  # fmt: skip
    """The training records, checked against the validation ones: refused (:class:`InputError`) when an id is in both
    and ``overlap`` is ``error``; without those records for ``drop``; all of them for ``keep``, with a warning."""
    val_ids = {id_key(r["id"]) for r in val}
    shared = [r for r in train if id_key(r["id"]) in val_ids]
    if not shared:
        return train
    count, example = len({id_key(r["id"]) for r in shared}), shared[0]["id"]
    what = f"{count} id(s) of data.val_file {val_file} are also in data.train_file {train_file} (e.g. {example!r})"
    if overlap == "error":
        raise InputError(f"{what}: validation would score records the adapter trains on; remove them from one file, "
                         "or pass --data.val_overlap drop (train without them) or keep")  # fmt: skip
    if overlap == "drop":
        left = len(train) - len(shared)
        log.warning("%s: dropped from training (data.val_overlap drop), %d record(s) left", what, left)
        return [r for r in train if id_key(r["id"]) not in val_ids]
    log.warning("%s: kept in training (data.val_overlap keep): validation scores records the adapter trains on", what)
    return train
