"""Entry point: ``python -m healthai <command> ...`` — a table from command to handler, the one place that turns
the user's errors into one line, and where known third-party noise is silenced (:mod:`healthai.quiet`) before a
command imports its libraries."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import importlib
import inspect
import os
import re
import sys

from healthai import quiet
from healthai.quiet import DEBUG_ENV_VAR, VERBOSE_ENV_VAR, VERBOSE_FLAG

LIGHTNING_COMMANDS = ("fit", "validate", "predict")
"""Commands run by LightningCLI (see :mod:`healthai.cli`)."""

FUNCTION_COMMANDS = {
    "label": "healthai.label:label",
    "evaluate": "healthai.evaluate:evaluate",
    "compare": "healthai.compare:compare",
    "synonyms": "healthai.suggest:Synonyms",
    "export": "healthai.export:export",
    "serve": "healthai.serve:serve",
}
"""Commands that are one plain function each; its typed, documented arguments are the command's flags (a function
of one dataclass takes that dataclass's fields as its flags)."""

POSITIONAL = {"compare": "systems"}
"""Commands whose bare words (not an option or its value) are the values of one list parameter:
``compare --references REF A.jsonl B.jsonl`` is ``compare --references REF --systems [A.jsonl, B.jsonl]``."""

USAGE = f"""usage: python -m healthai {{{",".join(LIGHTNING_COMMANDS)},label,evaluate,compare,synonyms,export,serve}} [--help] ...

  fit        LoRA fine-tuning (LightningCLI):      python -m healthai fit --config configs/qwen_lora.yaml
  predict    batched JSON predictions (LightningCLI): python -m healthai predict --config configs/predict.yaml
  validate   validation loss and generated-answer metrics of a model or adapter (LightningCLI)
  label      teacher labels through an OpenAI-compatible API
  evaluate   disease P/R/F1, JSON validity and reason ROUGE-L of a predictions file, with breakdowns
  compare    predictions files side by side: F1 differences with bootstrap intervals, an HTML report
  synonyms   synonyms suggest: unmatched diagnosis pairs ranked by similarity, for the synonym table
  export     merge the LoRA adapter into the base model for serving
  serve      the model over HTTP (LitServe): /predict, OpenAI /v1/chat/completions, a page at /

A user error (bad file, bad option) prints one line and exits with status 2; {DEBUG_ENV_VAR}=1 shows its traceback.
Known third-party noise (Lightning's tips, library deprecation warnings) is kept out of the output; {VERBOSE_FLAG} or
{DEBUG_ENV_VAR}=1 shows it (healthai/quiet.py lists each message).
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
    """Run ``python -m healthai COMMAND ...`` (``argv``: the arguments after the program name; in-process callers
    pass them). A bare ``--verbose`` anywhere belongs to this entry point, not to the command: it lets third-party
    noise through (:mod:`healthai.quiet`)."""
    argv_given = argv
    argv, verbose = quiet.take_verbose_flag(sys.argv[1:] if argv is None else argv)
    if argv_given is None:
        sys.argv[1:] = argv  # LightningCLI parses sys.argv itself, and DDP ranks rerun it: without the flag
    keep_quiet_unless(verbose)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in LIGHTNING_COMMANDS and command not in FUNCTION_COMMANDS:
        print(f"healthai: error: {unknown_command(command)}", file=sys.stderr)
        sys.exit(2)
    debug = os.environ.get(DEBUG_ENV_VAR, "") not in ("", "0")
    try:
        run(command, rest, argv_given is None)
    except user_error_types() as e:
        if debug:
            raise
        print(f"healthai {command}: error: {user_message(e, command)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # Disk full, read-only, permission denied, immutable, a link loop: the user's or the machine's to fix, said
        # here once for every command (healthai/paths.py); any other OSError is a bug and keeps its traceback.
        from healthai.paths import os_error_line

        line = os_error_line(e)
        if line is None or debug:
            raise
        print(f"healthai {command}: error: {line}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # Ctrl+C before a command installs its own handling (label's start-up, an import): the shell's 128 + SIGINT,
        # no traceback. Commands that handle it themselves (label's run, predict, fit) say how to resume.
        if debug:
            raise
        print(f"healthai {command}: interrupted", file=sys.stderr)
        sys.exit(130)


def unknown_command(command: str) -> str:
    """The line for a command that is not one: the closest command name when there is one (a typo, ``fti``)."""
    import difflib

    commands = [*LIGHTNING_COMMANDS, *FUNCTION_COMMANDS]
    close = difflib.get_close_matches(command, commands, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown command {command!r}{hint} (commands: {', '.join(commands)})"


def keep_quiet_unless(verbose: bool) -> None:
    """Silence known third-party noise (:func:`healthai.quiet.install`) unless ``--verbose`` was given or the
    environment asks for everything (``HEALTHAI_VERBOSE=1`` or ``HEALTHAI_DEBUG=1``). ``--verbose`` is passed on to
    the processes the command starts through the environment."""
    if verbose:
        os.environ[VERBOSE_ENV_VAR] = "1"
    quiet.install_unless_verbose()


def run(command: str, rest: list[str], from_shell: bool) -> None:
    """Run one command; user errors propagate to :func:`main`."""
    with libraries_loading(own_process=from_shell):
        import jsonargparse

        if command in LIGHTNING_COMMANDS:
            from healthai.cli import cli_main
        else:  # imported lazily so that one command's --help does not import every stage's dependencies
            module_name, fn_name = FUNCTION_COMMANDS[command].split(":")
            fn = getattr(importlib.import_module(module_name), fn_name)
    if command in LIGHTNING_COMMANDS:
        # LightningCLI reads sys.argv itself when run from the shell; args are passed only for in-process calls.
        cli_main(None if from_shell else [command, *rest])
        return
    # exit_on_error=False: a bad flag value raises ArgumentError, reported as one line by main().
    if command in POSITIONAL:
        rest = gather_positionals(rest, POSITIONAL[command])
    settings_type = _settings_dataclass(fn)
    cli_kwargs = dict(args=rest, as_positional=False, prog=f"python -m healthai {command}", exit_on_error=False,
                      description=summary(settings_type or fn))  # fmt: skip
    if settings_type is None:
        jsonargparse.CLI(fn, **cli_kwargs)
    else:
        # Its fields are documented by the string under each (litgpt's style); let --help show those. Only here:
        # this reads the source of every class parsed, which makes LightningCLI's parser several times slower.
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
        fn(jsonargparse.CLI(settings_type, **cli_kwargs))


@contextlib.contextmanager
def libraries_loading(own_process: bool):
    """Import a command's libraries without garbage collection, then keep what they built out of the collector's
    sight (:func:`gc.freeze`). Importing torch, transformers and Lightning creates ~450k long-lived objects, and the
    full collections those imports trigger walked them again each time: 0.4-0.6 s of every command's start on a
    2-core CPU (and of each DDP rank's). Frozen, they are no longer walked by the collections of a long fit either, nor copied on write
    by forked data-loader workers. Only when the command owns the process (``python -m healthai``): an in-process
    caller's objects are its own business. At exit they are collectable again: ``python -m healthai`` ends without a
    last collection (:mod:`healthai.fast_exit`), but a program that calls :func:`main` itself ends through it
    (nanobind, which triton's and xgrammar's bindings use, reports any of its objects still alive then as leaked)."""
    if not own_process or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
        atexit.register(gc.unfreeze)


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


def summary(component) -> str | None:
    """The first paragraph of ``component``'s docstring, on one line: what the command's ``--help`` opens with.
    jsonargparse would take only the docstring's first line, which cuts a summary that wraps onto a second line."""
    doc = inspect.getdoc(component)
    return " ".join(doc.split("\n\n", 1)[0].split()) if doc else None


def _settings_dataclass(fn) -> type | None:
    """The dataclass type of ``fn``'s only parameter, if it takes exactly one dataclass."""
    params = list(inspect.signature(fn).parameters.values())
    if len(params) != 1:
        return None
    annotation = inspect.get_annotations(fn, eval_str=True).get(params[0].name)
    return annotation if dataclasses.is_dataclass(annotation) else None


if __name__ == "__main__":
    # Out as the interpreter would end, less its teardown of every loaded module: 1.3-1.9 s of CPU a command and a
    # rank (healthai/fast_exit.py).
    from healthai.fast_exit import run_then_exit

    run_then_exit(main)
