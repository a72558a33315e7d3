"""setup.cfg allows only the transformers the code runs on: the decoding settings rely on a transformers 5 API."""

from __future__ import annotations

import configparser
from importlib.metadata import version

from packaging.requirements import Requirement

from conftest import REPO


def transformers_requirement() -> Requirement:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg", encoding="utf-8")
    lines = [line.split("#")[0].strip() for line in config["options"]["install_requires"].splitlines()]
    return next(Requirement(line) for line in lines if line.startswith("transformers"))


def test_setup_cfg_pins_transformers_to_the_major_version_the_code_uses():
    from transformers import GenerationConfig

    spec = transformers_requirement().specifier
    # GenerationSettings.transformers_config needs GenerationConfig._get_default_generation_params (transformers 5).
    assert hasattr(GenerationConfig, "_get_default_generation_params")
    assert version("transformers") in spec  # the tested version is allowed
    assert not spec.contains("4.57.1") and not spec.contains("6.0.0")  # 4.x lacks the API; 6 is untested
