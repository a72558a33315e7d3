"""Validation writes a table of sample generations to TensorBoard's text tab: read back from the event file. (Under
DDP the table is checked by tests/test_distributed.py's 2-process fit, which imports the readers below.)"""

from __future__ import annotations

import html
import re
from pathlib import Path

from conftest import labelled_records, write_jsonl

from healthai.cli import cli_main
from healthai.decoding import ParsedAnswer
from healthai.samples import SAMPLE_COLUMNS, merge_rank_samples, sample_row, samples_markdown

TAG = "val/samples/text_summary"  # add_text("val/samples", ...) is stored under this tensor tag


def rendered_rows(markdown: str) -> list[list[str]]:
    """The table's body rows as TensorBoard's text plugin shows them: its own markdown → sanitised HTML, each cell
    back to plain text (``<br>`` as a newline, entities unescaped)."""
    from tensorboard.plugin_util import markdown_to_safe_html

    page = markdown_to_safe_html(markdown)
    body = re.search(r"<tbody>(.*)</tbody>", page, re.S)
    assert body, page
    rows = []
    for tr in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S):
        cells = re.findall(r"<td>(.*?)</td>", tr, re.S)
        rows.append([html.unescape(re.sub(r"<br\s*/?>", "\n", c)) for c in cells])
    return rows


def text_summaries(run_dir: Path) -> list[tuple[int, str]]:
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={TENSORS: 0})  # 0 = keep every event
    acc.Reload()
    assert TAG in acc.Tags()["tensors"], acc.Tags()
    return [(e.step, e.tensor_proto.string_val[0].decode("utf-8")) for e in acc.Tensors(TAG)]


def test_validation_logs_the_same_first_records_as_a_table_each_time_it_generates(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(2))
    val_records = labelled_records(3, offset=2)
    val = write_jsonl(tmp_path / "val.jsonl", val_records)
    cli_main([
        "fit", "--config", "configs/tiny.yaml",
        "--model.model_name_or_path", str(tiny_model_dir),
        "--data.train_file", str(train), "--data.val_file", str(val), "--data.max_length", "160",
        "--data.batch_size", "2", "--data.eval_batch_size", "1",  # the two logged rows come from separate batches
        "--trainer.max_epochs", "2", "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
        "--model.generate_every_n_epochs", "1", "--model.val_generate_limit", "3", "--model.val_log_samples", "2",
        "--model.generation.max_new_tokens", "34", "--model.generation.constrained", "false",
    ])  # fmt: skip
    summaries = text_summaries(tmp_path / "tiny" / "version_0")
    assert [step for step, _ in summaries] == [1, 2]  # one table per validation that generated (1 step per epoch)
    for step, markdown in summaries:
        assert f"step {step}: the first 2 validation records" in markdown
        rows = rendered_rows(markdown)
        assert len(rows) == 2 and all(len(r) == len(SAMPLE_COLUMNS) for r in rows), rows
        for row, record in zip(rows, val_records):  # the first two validation records, in file order
            cell = dict(zip(SAMPLE_COLUMNS, row))
            assert cell["id"] == str(record["id"])
            text = record["feature_content"]
            # markdown drops a cell's trailing blanks; everything else comes back as written
            assert cell["case"] == (text if len(text) <= 200 else text[:200] + "…").rstrip()
            assert cell["reference"] == record["diseases"]
            assert cell["parse"] in ("ok", "repaired", "failed")
            # 4 new tokens cannot close the JSON: the answer fails to parse, nothing is predicted or matched
            assert cell["parse"] == "failed" and cell["predicted"] == "" and cell["matched"] == cell["extra"] == ""
            assert cell["missed"] == record["diseases"]  # every reference name is missed
            assert cell["reason"].startswith("(raw output) ")


def test_sample_row_uses_the_metric_matching_of_disease_names():
    answer = ParsedAnswer("1、高血压 2、冠心病", "血压高；胸痛。", status="ok")
    row = sample_row("r1", "患者" * 150, {"diseases": "2型糖尿病；高血压", "reason": "x"}, answer)
    assert row["matched"] == "高血压" and row["missed"] == "2型糖尿病" and row["extra"] == "冠心病"
    assert row["case"] == "患者" * 100 + "…" and row["parse"] == "ok" and row["reason"] == "血压高；胸痛。"
    assert row["reference"] == "2型糖尿病；高血压" and row["predicted"] == "1、高血压 2、冠心病"


def test_table_cells_survive_pipes_newlines_and_markup():
    nasty = "a | b\nline two\\|x *bold* _u_ `c` [l](h) <script>x</script> & 1"
    row = dict.fromkeys(SAMPLE_COLUMNS, "plain")
    row["case"] = row["reason"] = nasty
    rows = rendered_rows(samples_markdown([row, dict(row, id="second")], "title"))
    assert len(rows) == 2
    assert rows[0] == [nasty if c in ("case", "reason") else "plain" for c in SAMPLE_COLUMNS]
    assert rows[1][0] == "second"


def test_rank_samples_merge_into_dataset_order_without_sampler_padding():
    rec = lambda i: {"id": f"r{i}"}  # noqa: E731
    # 5 records on 2 ranks: rank 0 holds 0, 2, 4; rank 1 holds 1, 3 and the padding repeat of record 0
    shards = [[rec(0), rec(2), rec(4)], [rec(1), rec(3), rec(0)]]
    assert [r["id"] for r in merge_rank_samples(shards, 8)] == ["r0", "r1", "r2", "r3", "r4"]
    assert [r["id"] for r in merge_rank_samples(shards, 3)] == ["r0", "r1", "r2"]
    assert merge_rank_samples([[], []], 4) == []
