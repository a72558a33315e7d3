"""Issue 34 item 1: every ``python -m healthai`` command in README.md and docs/*.md stays runnable — the configs it
names exist and every flag parses (``--print_config``: parsed and checked, nothing loaded or run)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO
from healthai.__main__ import main

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

RUN_CONFIG = re.compile(r"^(RUN|checkpoints/[^/]+/version_\d+)/predict\.yaml$")
"""A run folder's predict.yaml, which fit writes (tests/test_run_folder.py runs one as printed): parsed here in the
place of configs/predict.yaml, the same options for the 7B."""


def shell_commands(markdown: str) -> list[str]:
    """The ``python -m healthai ...`` lines of the page's code blocks, continuation lines joined, comments cut."""
    found, in_code, pending = [], False, ""
    for line in markdown.split("\n"):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code or line.lstrip().startswith("#"):
            continue
        line = pending + re.sub(r"\s+#\s.*$", "", line).strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        match = re.search(r"python -m healthai (.*)", line)
        if match:
            found.append(match.group(1))
    return found


def argv_of(command: str) -> list[str]:
    """The command's arguments as the shell passes them; ``...`` (an elided value or rest) becomes a placeholder value
    or is dropped, and a run folder's predict.yaml becomes configs/predict.yaml (see :data:`RUN_CONFIG`)."""
    argv: list[str] = []
    for word in shlex.split(command):
        if word == "...":
            if argv and argv[-1].startswith("--") and "=" not in argv[-1]:
                argv.append("ELIDED")
            continue
        if argv and argv[-1] == "--config" and RUN_CONFIG.match(word):
            word = "configs/predict.yaml"
        argv.append(word)
    return argv


COMMANDS = sorted({(page.relative_to(REPO).as_posix(), c) for page in PAGES for c in shell_commands(page.read_text())})


def parse(argv: list[str]) -> str:
    """``python -m healthai ARGV --print_config`` in-process: the printed config, or the one-line error (exit 2)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        main([*argv, "--print_config"])
    assert info.value.code in (0, None), f"exit status {info.value.code}"
    return out.getvalue()


def test_the_pages_hold_the_commands_of_the_recipe():
    readme = [c.split()[0] for page, c in COMMANDS if page == "README.md"]
    assert {"label", "fit", "predict", "compare"} <= set(readme), readme
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("page, command", COMMANDS)
def test_a_documented_command_parses(page, command, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs are named relative to the repository, as the pages run them
    argv = argv_of(command)
    for config in (argv[i + 1] for i, word in enumerate(argv) if word == "--config"):
        assert Path(config).is_file(), f"{page}: {config} does not exist"
    printed = parse(argv)
    assert printed.strip(), f"{page}: nothing parsed for {command}"


def test_a_flag_that_does_not_exist_is_caught(monkeypatch, capsys):
    """The check above can fail: a misspelt flag of a documented command is a parse error (exit status 2)."""
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "configs/qwen_lora.yaml", "--model.lora_rank", "8", "--print_config"])
    assert info.value.code == 2 and "lora_rank" in capsys.readouterr().err
