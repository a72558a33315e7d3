"""The GPU machine has no network: every requirement must resolve there from the pinned wheels
(``scripts/gpu_wheels.txt``) or its image. ``scripts/fetch_gpu_wheels.sh`` checks the downloaded wheels; these tests run
the same check offline on the pinned list, so a new dependency breaks the suite, not the first GPU session."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO
from healthai.__main__ import main


def gpu_wheels():
    spec = importlib.util.spec_from_file_location("gpu_wheels", REPO / "scripts" / "gpu_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_requirement_resolves_from_the_pins_and_the_gpu_image():
    assert gpu_wheels().check_pins() == []


def test_a_pin_changed_without_fetching_it_is_named(tmp_path):
    g = gpu_wheels()
    pins = tmp_path / "pins.txt"
    pins.write_text(g.PINS.read_text(encoding="utf-8").replace("peft==0.21.2", "peft==0.22.0"), encoding="utf-8")
    assert g.check_pins(pins) == ["gpu_wheels.requires.json does not record peft==0.22.0: run bash "
                                  "scripts/fetch_gpu_wheels.sh (with PyPI access) and commit it"]  # fmt: skip


def test_the_checked_requirements_are_the_projects_and_the_gpu_and_report_extras():
    g = gpu_wheels()
    names = {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0] for r in g.project_requirements()}
    assert {"lightning", "transformers", "peft", "xgrammar", "scipy", "liger-kernel", "matplotlib"} <= names
    assert "litserve" not in names  # serve's extra: the GPU check measures nothing through it


def test_a_requirement_neither_pinned_nor_in_the_image_is_named():
    """What stopped fetch_gpu_wheels.sh on main: litserve in install_requires."""
    g = gpu_wheels()
    fetched = {name: (version, None) for name, version in g.pins().items()}
    assert g.problems(fetched, ["litserve>=0.2.19,<0.3"]) == [
        "healthai needs litserve<0.3,>=0.2.19: neither fetched nor on the GPU machine"
    ]
    # A known version in the image that does not match, and a fetched wheel's own unmet need, are named too.
    assert g.problems(fetched, ["torch>=2.12"]) == ["healthai needs torch>=2.12, but torch 2.11.0 is on the GPU machine"]
    fetched["peft"] = (fetched["peft"][0], ["no-such-package>=1"])
    assert g.problems(fetched, []) == [f"peft {fetched['peft'][0]} needs no-such-package>=1: neither fetched nor on "
                                       "the GPU machine"]  # fmt: skip


def test_serve_without_litserve_is_one_line_naming_the_extra(monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "litserve", None)  # as if not installed: find_spec gives None
    monkeypatch.delitem(sys.modules, "healthai.serve", raising=False)
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["serve", "--model_name_or_path", "models/tiny-qwen2.5"])
    assert info.value.code == 2
    assert capfd.readouterr().err == (
        "healthai serve: error: healthai serve needs litserve, which is not installed: it comes with the 'serve' "
        "extra (pip install -e '.[serve]' in a clone, pip install 'healthai[serve]' otherwise)\n"
    )
