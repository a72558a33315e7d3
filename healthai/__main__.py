"""Entry point: ``python -m healthai <command> ...`` — a table from command to handler, nothing else."""

from __future__ import annotations

import importlib
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "predict")
"""Commands run by LightningCLI (see :mod:`healthai.cli`)."""

FUNCTION_COMMANDS = {
    "label": "healthai.label:label",
    "evaluate": "healthai.evaluate:evaluate",
    "export": "healthai.export:export",
    "serve": "healthai.serve:serve",
}
"""Commands that are one plain function each; its typed, documented arguments are the command's flags."""


USAGE = f"""usage: python -m healthai {{{",".join(LIGHTNING_COMMANDS)},label,evaluate,export,serve}} [--help] ...

  fit        LoRA fine-tuning (LightningCLI):      python -m healthai fit --config configs/qwen_lora.yaml
  predict    batched JSON predictions (LightningCLI): python -m healthai predict --config configs/predict.yaml
  validate   validation loss and generated-answer metrics of a model or adapter (LightningCLI)
  label      teacher labels through an OpenAI-compatible API
  evaluate   disease P/R/F1, JSON validity and reason ROUGE-L of a predictions file
  export     merge the LoRA adapter into the base model for serving
  serve      the model over HTTP (LitServe): /predict, OpenAI /v1/chat/completions, a page at /
"""


def main(argv: list[str] | None = None) -> None:
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_COMMANDS:
        from healthai.cli import cli_main

        # LightningCLI reads sys.argv itself when run from the shell; args are passed only for in-process calls.
        cli_main(None if argv_given is None else [command, *rest])
        return
    if command not in FUNCTION_COMMANDS:
        sys.exit(f"unknown command {command!r}\n\n{USAGE}")
    # Imported lazily so that one command's --help does not import every stage's dependencies.
    module_name, fn_name = FUNCTION_COMMANDS[command].split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    from jsonargparse import CLI

    CLI(fn, args=rest, as_positional=False, prog=f"python -m healthai {command}")


if __name__ == "__main__":
    main()
