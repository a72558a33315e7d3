"""Every YAML in configs/ parses against the code (configs cannot rot) and opens with the command that runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from healthai.cli import cli_main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
COMMAND = re.compile(r"^# python -m healthai (fit|validate|predict) --config (configs/\S+\.yaml)")


def test_there_are_configs():
    assert {"tiny.yaml", "qwen_lora.yaml", "predict.yaml", "predict_tiny.yaml", "baseline.yaml"} <= {
        c.name for c in CONFIGS
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_with_its_command(config, capsys, monkeypatch):
    monkeypatch.chdir(config.parents[1])
    first = config.read_text(encoding="utf-8").splitlines()[0]
    match = COMMAND.match(first)
    assert match, f"{config.name} must open with '# python -m healthai <command> --config configs/{config.name}'"
    command, path = match.groups()
    assert path == f"configs/{config.name}"
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model_name_or_path:" in printed and "data:" in printed
    if command == "predict":
        assert "output_path:" in printed
