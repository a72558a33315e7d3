"""Entry point: ``python -m healthai <command> ...`` — a table from command to handler, and the one place that turns
the user's errors into one line."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "predict")
"""Commands run by LightningCLI (see :mod:`healthai.cli`)."""

FUNCTION_COMMANDS = {
    "label": "healthai.label:label",
    "evaluate": "healthai.evaluate:evaluate",
    "compare": "healthai.compare:compare",
    "export": "healthai.export:export",
    "serve": "healthai.serve:serve",
}
"""Commands that are one plain function each; its typed, documented arguments are the command's flags (a function
of one dataclass takes that dataclass's fields as its flags)."""

POSITIONAL = {"compare": "systems"}
"""Commands whose bare words (not an option or its value) are the values of one list parameter:
``compare --references REF A.jsonl B.jsonl`` is ``compare --references REF --systems [A.jsonl, B.jsonl]``."""

DEBUG_ENV_VAR = "HEALTHAI_DEBUG"
"""Set to 1 to see the traceback of a user error instead of its one line."""

USAGE = f"""usage: python -m healthai {{{",".join(LIGHTNING_COMMANDS)},label,evaluate,compare,export,serve}} [--help] ...

  fit        LoRA fine-tuning (LightningCLI):      python -m healthai fit --config configs/qwen_lora.yaml
  predict    batched JSON predictions (LightningCLI): python -m healthai predict --config configs/predict.yaml
  validate   validation loss and generated-answer metrics of a model or adapter (LightningCLI)
  label      teacher labels through an OpenAI-compatible API
  evaluate   disease P/R/F1, JSON validity and reason ROUGE-L of a predictions file, with breakdowns
  compare    predictions files side by side: F1 differences with bootstrap intervals, an HTML report
  export     merge the LoRA adapter into the base model for serving
  serve      the model over HTTP (LitServe): /predict, OpenAI /v1/chat/completions, a page at /

A user error (bad file, bad option) prints one line and exits with status 2; {DEBUG_ENV_VAR}=1 shows its traceback.
"""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix: the project's own, a missing input file, a rejected option value."""
    from jsonargparse import ArgumentError

    from healthai.errors import UserError  # BadRecordError and ConfigError are UserErrors

    return UserError, FileNotFoundError, NotADirectoryError, ArgumentError


def user_message(error: BaseException, command: str = "") -> str:
    """The error's message on one line (:func:`healthai.errors.one_line`), with jsonargparse's ``Parser key
    "name":`` said as the project names that option (``data.batch_size`` of LightningCLI, ``--concurrency`` of a
    function command), so an out-of-range value reads the same from the parser as from the class's own check."""
    from healthai.errors import one_line

    text = one_line(error)
    dashes = "--" if command in FUNCTION_COMMANDS else ""
    return re.sub(r'^Parser key "([^"]+)":', lambda key: f"{dashes}{key.group(1)}:", text)


def main(argv: list[str] | None = None) -> None:
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in LIGHTNING_COMMANDS and command not in FUNCTION_COMMANDS:
        sys.exit(f"unknown command {command!r}\n\n{USAGE}")
    try:
        run(command, rest, argv_given is None)
    except user_error_types() as e:
        if os.environ.get(DEBUG_ENV_VAR, "") not in ("", "0"):
            raise
        print(f"healthai {command}: error: {user_message(e, command)}", file=sys.stderr)
        sys.exit(2)


def run(command: str, rest: list[str], from_shell: bool) -> None:
    """Run one command; user errors propagate to :func:`main`."""
    import jsonargparse

    if command in LIGHTNING_COMMANDS:
        from healthai.cli import cli_main

        # LightningCLI reads sys.argv itself when run from the shell; args are passed only for in-process calls.
        cli_main(None if from_shell else [command, *rest])
        return
    # Imported lazily so that one command's --help does not import every stage's dependencies.
    module_name, fn_name = FUNCTION_COMMANDS[command].split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    # exit_on_error=False: a bad flag value raises ArgumentError, reported as one line by main().
    if command in POSITIONAL:
        rest = gather_positionals(rest, POSITIONAL[command])
    cli_kwargs = dict(args=rest, as_positional=False, prog=f"python -m healthai {command}", exit_on_error=False)
    settings_type = _settings_dataclass(fn)
    if settings_type is None:
        jsonargparse.CLI(fn, **cli_kwargs)
    else:
        # Its fields are documented by the string under each (litgpt's style); let --help show those. Only here:
        # this reads the source of every class parsed, which makes LightningCLI's parser several times slower.
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
        fn(jsonargparse.CLI(settings_type, **cli_kwargs))


def gather_positionals(args: list[str], name: str) -> list[str]:
    """``args`` with its bare words moved into one ``--name=[...]`` option. Every option of these commands takes a
    value (``--flag value`` or ``--flag=value``), except ``-h``/``--help`` and ``--print_config`` (whose flags go
    after ``=``); a word after any other option is its value."""
    import json

    rest, words, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and len(arg) > 1:
            rest.append(arg)
            if "=" not in arg and arg not in ("-h", "--help", "--print_config") and i + 1 < len(args):
                rest.append(args[i + 1])
                i += 1
        else:
            words.append(arg)
        i += 1
    return rest + ([f"--{name}={json.dumps(words, ensure_ascii=False)}"] if words else [])


def _settings_dataclass(fn) -> type | None:
    """The dataclass type of ``fn``'s only parameter, if it takes exactly one dataclass."""
    params = list(inspect.signature(fn).parameters.values())
    if len(params) != 1:
        return None
    annotation = inspect.get_annotations(fn, eval_str=True).get(params[0].name)
    return annotation if dataclasses.is_dataclass(annotation) else None


if __name__ == "__main__":
    main()
