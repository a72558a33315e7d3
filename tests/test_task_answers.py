"""Issue 28, end to end: answers as the task writes them (numbered reasons with newlines, quotes, backslashes, a
doctor's 88-character diagnosis list) go through label → fit → predict with the default configs, and a model that has
learned them writes them back exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, read_jsonl, seed_records, write_jsonl
from healthai.__main__ import main
from healthai.cli import cli_main
from test_truncation import DOCTORS_LIST

MEMORISED = [
    (DOCTORS_LIST, '1. 血肌酐升高；\n2. 患者自述"口干多饮"；\n3. 尿蛋白\\阳性。'),
    ("发热", '1. 患者主诉发热10天；\\n2. 体温正常（≥37.3℃）；\n3.\t无"咳嗽"。'),
    ("多囊卵巢综合征（PCOS）", "1. 未避孕未孕3年；\n2. B超示PCO。"),
]
"""Labels with every escape json.dumps writes in them (a newline, a tab, quotes, a backslash, the two characters
``\\n`` as the official examples hold them) and a diagnosis list of 88 characters."""


def run_args(tmp_path: Path, name: str, checkpoints: bool = True) -> list[str]:
    """Keep the run under ``tmp_path``; ``checkpoints=False`` for a config with no checkpoint callback (demo.yaml)."""
    runs = str(tmp_path / name)
    ckpt = ["--trainer.callbacks.dirpath", f"{runs}/ckpt"] if checkpoints else []
    return ["--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs, *ckpt,
            "--trainer.enable_progress_bar", "false"]  # fmt: skip


def adapter_of(tmp_path: Path, name: str) -> Path:
    (adapter,) = (tmp_path / name).glob("*/version_*/adapter")
    return adapter


@pytest.mark.slow
def test_a_model_that_learned_answers_with_escapes_writes_them_back_exactly(tmp_path, tiny_model_dir, monkeypatch):
    """The small model overfits three labels with the demo's memorisation settings (configs/demo.yaml: LoRA r 32,
    LR 0.03) but an LR that decays to 0. At the demo's constant LR the loss on these long answers still bounces (0.2
    to 0.5 over the last steps), so whether the last step landed on a memorised point depended on the CPU's kernels
    (with AVX2, 45 and 60 steps failed and 80 passed; unvectorised, 60 passed and 45 failed). Decayed, 35 steps pass
    with AVX2 and with ATEN_CPU_CAPABILITY=default, 30 fail with one; 45 are run. Predict with its adapter — the
    budget it saved, no decoding option given — writes each answer back character for character, parse_status ok.
    The records are cut to their first 80 characters: the answers are what is tested, and the step cost falls with
    the prompt."""
    monkeypatch.chdir(REPO)
    rows = [{**r, "feature_content": r["feature_content"][:80], "diseases": d, "reason": x}
            for r, (d, x) in zip(seed_records(3, offset=10), MEMORISED)]  # fmt: skip
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cli_main(["fit", "--config", "configs/demo.yaml", "--model.model_name_or_path", str(tiny_model_dir),
              "--data.train_file", str(data), "--data.val_file", str(data), "--data.val_overlap", "keep",
              *run_args(tmp_path, "runs", checkpoints=False),
              "--trainer.max_epochs", "45", "--model.min_lr_ratio", "0.0", "--trainer.limit_val_batches", "0",
              "--data.batch_size", "3", "--data.max_length", "512"])  # fmt: skip
    out = tmp_path / "pred.jsonl"
    cli_main(["predict", "--config", "configs/predict_tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
              "--model.adapter_path", str(adapter_of(tmp_path, "runs")), "--data.predict_file", str(data),
              "--writer.output_path", str(out), "--writer.progress", "false"])  # fmt: skip
    predicted = {r["id"]: r for r in read_jsonl(out)}
    for row in rows:
        got = predicted[row["id"]]
        assert (got["diseases"], got["reason"], got["parse_status"]) == (row["diseases"], row["reason"], "ok")


@pytest.mark.slow
def test_label_then_fit_then_predict_with_the_default_configs(tmp_path, tiny_model_dir, monkeypatch):
    """A teacher that answers numbered reasons with real newlines, as the teacher prompt invites: label keeps them as
    written, fit takes every label with configs/tiny.yaml unchanged (the caps refused 12 of 12 before), and predict
    with configs/predict_tiny.yaml answers every record in strict JSON."""
    from fake_openai_server import GOOD_ANSWER, FakeOpenAIServer

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HEALTHAI_API_KEY", "sk-test-chain-0123456789")
    records = seed_records(12, offset=50)
    src = write_jsonl(tmp_path / "records.jsonl", records)
    labels = tmp_path / "labelled.jsonl"
    with FakeOpenAIServer() as server:
        main(["label", "--input", str(src), "--output", str(labels), "--base_url", server.base_url,
                  "--model", "teacher", "--progress", "false"])  # fmt: skip
    labelled = read_jsonl(labels)
    assert len(labelled) == 12 and all(r["reason"] == GOOD_ANSWER["reason"] for r in labelled)
    assert "\n" in GOOD_ANSWER["reason"]  # a real newline, stored as the teacher wrote it

    cli_main(["fit", "--config", "configs/tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
              "--data.train_file", str(labels), "--data.val_file", str(labels),
              "--data.val_overlap", "keep", *run_args(tmp_path, "runs"),
              "--trainer.max_epochs", "1"])  # fmt: skip
    out = tmp_path / "pred.jsonl"
    # The 12 records in one batch (the config's 8 makes two): the young adapter writes to the budget, and a decoding
    # step costs the same for 12 rows as for 8 on the small model.
    cli_main(["predict", "--config", "configs/predict_tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
              "--model.adapter_path", str(adapter_of(tmp_path, "runs")), "--data.predict_file", str(src),
              "--data.eval_batch_size", "12", "--writer.output_path", str(out),
              "--writer.progress", "false"])  # fmt: skip
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert all(r["parse_status"] in ("ok", "truncated") for r in rows), rows
