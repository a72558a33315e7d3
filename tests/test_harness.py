"""The suite's own machinery, where a fault would not fail a test but make tests meet something other than what a
user's command meets: the shared tokenizers (tests/shared_tokenizers.py) hand out a loaded tokenizer only for the same
files (but for where they say they were loaded from), the fork server's children find the small model's tokenizer
preloaded unless asked not to (tests/forkserver.py), and the files run costliest first (tests/file_costs.py)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import file_costs
from shared_tokenizers import SharedTokenizers


def tokenizer_copy(source, folder):
    folder.mkdir()
    for name in SharedTokenizers.FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


def test_a_folder_with_the_same_tokenizer_files_gets_the_loaded_object_and_any_change_loads_afresh(
    tmp_path, tiny_model_dir
):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert AutoTokenizer.from_pretrained(tokenizer_copy(tiny_model_dir, tmp_path / "copy")) is loaded
    changed = tokenizer_copy(tiny_model_dir, tmp_path / "changed")
    template = changed / "chat_template.jinja"
    template.write_text(template.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    other = AutoTokenizer.from_pretrained(changed)
    assert other is not loaded and other.chat_template == loaded.chat_template + "\n"
    assert AutoTokenizer.from_pretrained(tiny_model_dir, padding_side="left") is not loaded  # other arguments
    # An adapter's copy (save_pretrained of a loaded tokenizer) differs from the small model's folder only in where it
    # says it was loaded from (tokenizer_config.json's is_local, local_files_only): the same object. A real change in
    # that file is another tokenizer.
    loaded.save_pretrained(tmp_path / "saved")
    saved_config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert {"is_local", "local_files_only"} <= saved_config.keys()
    assert AutoTokenizer.from_pretrained(tmp_path / "saved") is loaded
    (tmp_path / "saved" / "tokenizer_config.json").write_text(
        json.dumps({**saved_config, "model_max_length": 4096}), encoding="utf-8"
    )
    resized = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert resized is not loaded and resized.model_max_length == 4096


def test_a_forked_command_finds_the_tokenizer_and_its_grammar_loaded_unless_asked_to_load_them(
    tmp_path, tiny_model_dir, forkserver
):
    # A fit's adapter folder holds the tokenizer as save_pretrained writes it: the server preloaded that copy too.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "adapter")
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, time\n"
        "from transformers import AutoTokenizer\n"
        "from healthai import decoding\n"
        "start = time.process_time()\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(tokenizer in decoding._COMPILED, time.process_time() - start)\n",
        encoding="utf-8",
    )  # fmt: skip
    for folder in (tiny_model_dir, tmp_path / "adapter"):
        preloaded = forkserver.run([script, folder])
        assert preloaded.returncode == 0, preloaded.stderr[-3000:]
        compiled, seconds = preloaded.stdout.split()
        assert compiled == "True" and float(seconds) < 0.2, preloaded.stdout
    fresh = forkserver.run([script, tiny_model_dir], preloaded=False)
    assert fresh.returncode == 0 and fresh.stdout.split()[0] == "False", fresh.stdout + fresh.stderr[-3000:]


def test_the_files_run_costliest_first_each_in_its_own_order(tmp_path, monkeypatch):
    costs = tmp_path / "file_costs.json"
    costs.write_text(json.dumps({"tests/test_b.py": 30.0, "tests/test_c.py": 2.0, "tests/test_d.py": 10.0}))
    monkeypatch.setattr(file_costs, "COSTS", costs)
    ids = ["tests/test_a.py::x", "tests/test_b.py::y", "tests/test_a.py::z", "tests/test_c.py::w",
           "tests/test_b.py::v", "tests/test_d.py::u"]  # fmt: skip
    items = [SimpleNamespace(nodeid=i) for i in ids]
    file_costs.pytest_collection_modifyitems(items)
    # test_a.py is not listed: it counts as the median (10 s); beside test_d.py's 10 s, collection order decides.
    assert [i.nodeid for i in items] == ["tests/test_b.py::y", "tests/test_b.py::v", "tests/test_a.py::x",
                                         "tests/test_a.py::z", "tests/test_d.py::u", "tests/test_c.py::w"]  # fmt: skip
