"""fit's model summary without the FLOPs column and total, which always read 0 for this model.

Lightning 2.5+ adds a FLOPs column and a "Total FLOPs" line to its model summary (``RichModelSummary``, the default
when ``rich`` is installed). They are counted only over a forward pass of the module's ``example_input_array``, and
``DiagnosisLoRA`` has none: a causal LM's cost depends on each batch's lengths, and a forward pass of the 7B base only
to fill a table would slow down every fit. Lightning has no option to leave the column out, so
:func:`without_flops` swaps its default summary for :class:`ParameterSummary`. That is the same table and parameter
totals, printed by ``rich`` as Lightning prints them, without FLOPs. ``trainer.enable_model_summary false`` still
turns the summary off.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback, RichModelSummary
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count

RIGHT_ALIGNED = {"Params", "Params per Device", "In sizes", "Out sizes"}
"""Columns Lightning's table aligns right (numbers)."""


class ParameterSummary(RichModelSummary):
    """Lightning's ``RichModelSummary`` (same ``max_depth`` and ``rich`` styling) without the FLOPs column and total."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int = 0,
                  **summarize_kwargs: Any) -> None:  # fmt: skip
        """Print the layer table and the totals as ``RichModelSummary.summarize`` does, without ``total_flops``
        (accepted, and ignored: Lightning before 2.5 passes none)."""
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in RIGHT_ALIGNED else "left",
                             style="dim" if name == " " else None, no_wrap=name == "Name")  # fmt: skip
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        totals = Table.grid(expand=True)
        totals.add_column()
        frozen = total_parameters - trainable_parameters
        for label, value in (("Trainable params", get_human_readable_count(int(trainable_parameters))),
                             ("Non-trainable params", get_human_readable_count(int(frozen))),
                             ("Total params", get_human_readable_count(int(total_parameters))),
                             ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
                             ("Modules in train mode", total_training_modes["train"]),
                             ("Modules in eval mode", total_training_modes["eval"])):  # fmt: skip
            totals.add_row(f"[bold]{label}[/]: {value}")
        console.print(totals)


def without_flops(callback: Callback) -> Callback:
    """``callback``, or a :class:`ParameterSummary` of the same depth and styling in place of Lightning's own
    ``RichModelSummary`` (only that exact class: a summary the user configured as another class is kept)."""
    if type(callback) is not RichModelSummary:
        return callback
    return ParameterSummary(callback._max_depth, **callback._summarize_kwargs)
