"""export's output folder (case 4 of issue 10): never the base model's or the adapter's folder (nor one holding
them), never a non-empty folder unless --overwrite, which clears it so no file of an earlier export is left."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import seed_records, write_jsonl
from healthai.__main__ import main
from healthai.prompts import PromptStyle


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """A private copy of the base (a test may try to write into it) and a random non-zero LoRA adapter on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("export_refusals")
    base = folder / "base"
    shutil.copytree(tiny_model_dir, base)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))  # fmt: skip
    adapter = folder / "adapter"
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    PromptStyle().save(adapter)
    return base, adapter


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def export(adapter: Path, out: Path, records: Path, *extra: str) -> None:
    main(["export", "--adapter", str(adapter), "--out", str(out), "--records", str(records), "--parity_records", "1",
          "--parity_max_tokens", "160", *extra])  # fmt: skip


@pytest.mark.parametrize("target", ["base", "adapter", "parent"])
def test_export_refuses_the_base_and_adapter_folders_even_with_overwrite(pair, tmp_path, capsys, target):
    base, adapter = pair
    out = {"base": base, "adapter": adapter, "parent": base.parent}[target]
    records = write_jsonl(tmp_path / "records.jsonl", seed_records(1))
    before = files(base.parent)
    for extra in ([], ["--overwrite", "true"]):
        with pytest.raises(SystemExit) as exit_info:
            export(adapter, out, records, "--base", str(base), *extra)
        message = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2
        assert message.startswith(f"healthai export: error: --out {out} would overwrite --") and "\n" not in message
    assert files(base.parent) == before  # not one byte of the base or the adapter changed


def test_a_non_empty_folder_needs_overwrite_which_leaves_no_stale_file(pair, tmp_path, capsys):
    base, adapter = pair
    records = write_jsonl(tmp_path / "records.jsonl", seed_records(1))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}', encoding="utf-8")  # an old sharded export
    (out / "old").mkdir()
    (out / "old" / "notes.txt").write_text("x", encoding="utf-8")
    before = files(out)
    with pytest.raises(SystemExit) as exit_info:
        export(adapter, out, records, "--base", str(base))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"healthai export: error: --out {out} is not empty; pass --overwrite "
                                               "true to replace its contents, or choose another folder")  # fmt: skip
    assert files(out) == before

    export(adapter, out, records, "--base", str(base), "--overwrite", "true")
    # Exactly a fresh export's files: the merged weights, config, generation config, tokenizer and prompt.
    assert set(files(out)) == {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                               "tokenizer_config.json", "chat_template.jinja", "prompt.json"}  # fmt: skip


def test_parity_records_with_a_repeated_id_are_refused(tmp_path):
    """#29 item 12: ``--records`` with a repeated id (``5`` and ``"5"`` too) checked one record twice; now refused."""
    from healthai.export import first_records
    from healthai.jsonl import BadRecordError

    path = tmp_path / "r.jsonl"
    write_jsonl(path, [{"id": 5, "feature_content": "甲"}, {"id": 6, "feature_content": "乙"},
                       {"id": "5", "feature_content": "丙"}])  # fmt: skip
    with pytest.raises(BadRecordError, match="repeats line 1") as caught:
        first_records(path, 8)
    assert ":3" in str(caught.value)
    assert [r["id"] for r in first_records(path, 2)] == [5, 6]  # only the lines needed are read
