"""Every command's ``--help`` opens with its whole summary: a first paragraph that ends with a full stop.

Run in-process through the real entry point (:func:`healthai.__main__.main`), as tests/test_errors.py does: a help
costs one command-line parse, about a second for a LightningCLI command.
"""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

import healthai.cli  # noqa: F401  (imported at collection, so Lightning's log handlers outlive each test's capture)
from healthai.__main__ import FUNCTION_COMMANDS, LIGHTNING_COMMANDS, _settings_dataclass, main

COMMANDS = [*LIGHTNING_COMMANDS, *FUNCTION_COMMANDS]


def description_of(help_text: str) -> str:
    """The paragraph after the usage lines, on one line (argparse wraps it to the terminal's width)."""
    blocks = help_text.split("\n\n")
    assert blocks[0].startswith("usage:"), help_text[:500]
    return " ".join(blocks[1].split())


def documented_summary(command: str) -> str:
    """The first paragraph of the docstring a function command is built from (its settings dataclass, if any)."""
    module_name, fn_name = FUNCTION_COMMANDS[command].split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    doc = inspect.getdoc(_settings_dataclass(fn) or fn)
    return " ".join(doc.split("\n\n")[0].split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_opens_with_the_whole_summary(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    out, err = capsys.readouterr()
    assert exited.value.code == 0, err
    summary = description_of(out)
    assert summary.endswith("."), summary  # a sentence cut where its first line ended would end with a comma
    assert len(summary.split()) >= 8, summary
    assert not re.search(r":(func|class|meth|mod):|``", summary), summary  # no reST markup in a terminal
    if command in FUNCTION_COMMANDS:
        # All of the first paragraph, not its first line (what jsonargparse takes by itself).
        assert summary == documented_summary(command)
    else:
        from lightning.pytorch import Trainer

        # Not Lightning's description of its Trainer method: predict's is cut mid-sentence ("... Useful to").
        assert inspect.getdoc(getattr(Trainer, command)).splitlines()[0] not in summary


def test_a_lightning_command_builds_the_parser_of_that_command_alone(monkeypatch, capsys):
    # LightningCLI builds every subcommand's parser (~0.25 s each) on every run; one is used.
    from healthai.cli import HealthAICLI
    from healthai.data import DiagnosisDataModule
    from healthai.model import DiagnosisLoRA

    built = []
    prepare = HealthAICLI._prepare_subcommand_parser

    def recorded(self, klass, subcommand, **kwargs):
        built.append(subcommand)
        return prepare(self, klass, subcommand, **kwargs)

    monkeypatch.setattr(HealthAICLI, "_prepare_subcommand_parser", recorded)
    for command in LIGHTNING_COMMANDS:
        built.clear()
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert built == [command]
    built.clear()  # no command named: each one python -m healthai runs through LightningCLI (not Lightning's test)
    with pytest.raises(SystemExit):
        HealthAICLI(DiagnosisLoRA, DiagnosisDataModule, args=["--help"])
    assert built == list(LIGHTNING_COMMANDS)
    assert "{fit,validate,predict}" in capsys.readouterr().out
