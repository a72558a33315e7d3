"""Every command answers a user's mistake with one line naming the file (and line) or the option, and a non-zero exit.

The matrix runs the real entry point (:func:`healthai.__main__.main`) in-process on each bad input: the errors are
found before any model loads, so a case costs about one command-line parse. Two cases run as real subprocesses to
check what a shell sees: the exit status and a stderr of one line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import healthai.cli  # noqa: F401  (imported at collection, so Lightning's log handlers outlive each test's capture)
from conftest import REPO, labelled_records, write_jsonl
from healthai.__main__ import main

CASES = ["missing file", "GBK bytes", "torn line", "duplicate id", "non-string field", "batch size 0",
         "missing model folder", "missing adapter folder"]  # fmt: skip
COMMANDS = ["fit", "validate", "predict", "label", "evaluate", "compare", "export"]

NOT_APPLICABLE = {
    # evaluate reads no case text and loads no model; its records' typed field is `diseases` (covered below).
    ("evaluate", "batch size 0"), ("evaluate", "missing model folder"), ("evaluate", "missing adapter folder"),
    ("compare", "batch size 0"), ("compare", "missing model folder"), ("compare", "missing adapter folder"),
    # label's model is a name on the server, not a folder; its "adapter folder" is --prompt_dir (covered).
    ("label", "missing model folder"),
    # export reads only the first --parity_records records as parity inputs: ids play no part, and there is no batch.
    ("export", "duplicate id"), ("export", "batch size 0"),
}


def bad_inputs(tmp: Path) -> dict[str, Path]:
    """One file per broken-input case, each with the defect at line 2 (line 1 is a good record)."""
    good = labelled_records(3)
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    files = {}

    def write(name: str, data: bytes) -> None:
        files[name] = tmp / f"{name.replace(' ', '_')}.jsonl"
        files[name].write_bytes(data)

    gbk = json.dumps({**good[1], "feature_content": "主诉: 头痛"}, ensure_ascii=False).encode("gbk")
    write("GBK bytes", (lines[0] + "\n").encode() + gbk + b"\n" + (lines[2] + "\n").encode())
    write("torn line", "\n".join([lines[0], lines[1][:40], lines[2]]).encode() + b"\n")
    # 5 and "5": one record by the id rule of every stage (healthai/records.py)
    dup = [dict(good[0], id=5), dict(good[1], id="5"), good[2]]
    write("duplicate id", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dup).encode())
    typed = [good[0], dict(good[1], feature_content=5, diseases=5), good[2]]
    write("non-string field", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in typed).encode())
    files["missing file"] = tmp / "no_such_file.jsonl"
    return files


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    files = bad_inputs(tmp)
    files["good"] = write_jsonl(tmp / "good.jsonl", labelled_records(3))
    # An adapter folder as far as export reads it before the records (its weights are never reached).
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    files["adapter"] = adapter
    files["model"] = tiny_model_dir
    return files


def command_line(command: str, case: str, inputs: dict[str, Path], tmp: Path) -> tuple[list[str], str]:
    """The argv of ``command`` run on ``case``, and the path or option its error line must name."""
    bad = inputs.get(case, inputs["good"])
    named = str(bad)
    missing_model, missing_adapter = str(tmp / "no_such_model"), str(tmp / "no_such_adapter")
    if command in ("fit", "validate", "predict"):
        model = missing_model if case == "missing model folder" else str(inputs["model"])
        argv = [command, "--model.model_name_or_path", model, "--model.dtype", "float32",
                "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.logger", "false",
                "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp)]  # fmt: skip
        if command == "predict":
            argv += ["--data.predict_file", str(bad), "--writer.output_path", str(tmp / "predictions.jsonl")]
        elif command == "validate":
            argv += ["--data.val_file", str(bad)]
        else:
            argv += ["--data.train_file", str(bad), "--data.val_file", str(inputs["good"])]
        size = "data.eval_batch_size" if command != "fit" else "data.batch_size"
        extra = {"batch size 0": [f"--{size}", "0"], "missing model folder": [],
                 "missing adapter folder": ["--model.adapter_path", missing_adapter]}  # fmt: skip
        named = {"batch size 0": size, "missing model folder": missing_model,
                 "missing adapter folder": missing_adapter}.get(case, named)  # fmt: skip
        return argv + extra.get(case, []), named
    if command == "label":
        argv = ["label", "--input", str(bad), "--output", str(tmp / "labels.jsonl"), "--base_url",
                "http://127.0.0.1:9/v1", "--model", "m", "--progress", "false"]  # fmt: skip
        if case == "batch size 0":
            return argv + ["--concurrency", "0"], "--concurrency"
        if case == "missing adapter folder":
            return argv + ["--prompt_dir", missing_adapter], missing_adapter
        return argv, named
    if command == "evaluate":
        return ["evaluate", "--predictions", str(inputs["good"]), "--references", str(bad)], named
    if command == "compare":
        return ["compare", "--references", str(bad), f"a={inputs['good']}", f"b={inputs['good']}"], named
    assert command == "export"
    adapter = missing_adapter if case == "missing adapter folder" else str(inputs["adapter"])
    argv = ["export", "--adapter", adapter, "--out", str(tmp / "merged"), "--records", str(bad)]
    if case == "missing model folder":
        return argv + ["--base", missing_model], missing_model
    return argv, (missing_adapter if case == "missing adapter folder" else named)


def run_in_process(argv: list[str], capfd) -> tuple[int, str]:
    """``(exit status, stderr)`` of one command run through the real entry point."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    code, err = info.value.code, capfd.readouterr().err
    if isinstance(code, str):  # sys.exit("message"): the interpreter would print it and exit with 1
        code, err = 1, err + code + "\n"
    return code, err


@pytest.mark.parametrize(
    "command, case", [(command, case) for command in COMMANDS for case in CASES if (command, case) not in NOT_APPLICABLE]
)
def test_user_error_is_one_line_naming_the_file_or_option(command, case, inputs, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HEALTHAI_API_KEY", "sk-test-0123456789")
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    argv, named = command_line(command, case, inputs, tmp_path)
    code, err = run_in_process(argv, capfd)
    assert code != 0
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == error_lines[0]  # the error is the last thing said
    assert named in error_lines[0]
    if case in ("GBK bytes", "torn line", "duplicate id", "non-string field"):
        assert f"{named}:2:" in error_lines[0]  # file:line
    if case == "GBK bytes":
        assert "not valid UTF-8" in error_lines[0]
    if case == "duplicate id":
        assert "duplicate" in error_lines[0] and "id" in error_lines[0]


def fit_argv(inputs: dict[str, Path], tmp: Path, *extra: str) -> list[str]:
    argv, _ = command_line("fit", "good", inputs, tmp)
    return argv + ["--data.batch_size", "1", *extra]


def refusal_cases(inputs: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Refusals that were tracebacks or silent overwrites (issue 17, points 4 and 6): ``case → (argv, the whole error
    line after "error: ")``."""
    good, empty = inputs["good"], tmp / "empty.jsonl"
    empty.write_bytes(b"")
    two = write_jsonl(tmp / "two.jsonl", labelled_records(2))
    folder = tmp / "a_folder"
    folder.mkdir()
    linked = tmp / "linked.jsonl"  # a hard link: another name for the same file
    os.link(good, linked)
    evaluate = ["evaluate", "--predictions", str(good), "--references", str(linked)]
    label = ["label", "--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--progress", "false"]
    serve = ["serve", "--model_name_or_path", str(inputs["model"]), "--device", "cpu"]
    failures_named = write_jsonl(tmp / "out.failures.jsonl", labelled_records(2))
    return {
        "fit: empty training file": (fit_argv(inputs, tmp, "--data.train_file", str(empty)),
                                     f"{empty}: no usable training records"),
        "fit: empty validation file": (fit_argv(inputs, tmp, "--data.val_file", str(empty)),
                                       f"{empty}: no usable validation records"),
        "fit: val_fraction takes every record": (
            fit_argv(inputs, tmp, "--data.train_file", str(two), "--data.val_file", "null", "--data.val_fraction",
                     "0.9", "--data.batch_size", "1"),
            f"data.val_fraction 0.9 leaves none of the 2 record(s) of {two} for training; lower it or give "
            "data.val_file"),
        "fit: an id in both train_file and val_file": (
            fit_argv(inputs, tmp, "--data.train_file", str(two)),
            f"2 id(s) of data.val_file {good} are also in data.train_file {two} (e.g. "
            f"{labelled_records(1)[0]['id']!r}): validation would score records the adapter trains on; remove them "
            "from one file, or pass --data.val_overlap drop (train without them) or keep"),
        "fit: val_fraction beside val_file": (
            fit_argv(inputs, tmp, "--data.val_fraction", "0.1"),
            f"data.val_fraction 0.1 and data.val_file {good} both say what validates; set only one "
            "(data.val_fraction null with a val_file)"),
        "fit: accumulate_grad_batches 0": (fit_argv(inputs, tmp, "--trainer.accumulate_grad_batches", "0"),
                                           "trainer.accumulate_grad_batches: Not of type PositiveInt: 0 does not "
                                           "conform to restriction v>0"),
        "predict: max_length under the prompt": (
            [*command_line("predict", "good", inputs, tmp)[0], "--data.max_length", "20"],
            "data.max_length 20 is too small: the prompt without any case text is 105 tokens; raise it"),
        "evaluate: --report is a folder": ([*evaluate, "--report", str(folder)],
                                           f"--report {folder} is a folder; give a file path"),
        "evaluate: --report is --predictions": (
            [*evaluate, "--report", str(good)],
            f"--report {good} would overwrite --predictions {good}; choose another path"),
        "evaluate: --per_record is --references (a hard link)": (
            [*evaluate, "--per_record", str(good)],
            f"--per_record {good} would overwrite --predictions {good}; choose another path"),
        "evaluate: --per_record is --report": (
            [*evaluate, "--report", str(tmp / "r.json"), "--per_record", str(tmp / "r.json")],
            f"--per_record {tmp / 'r.json'} would overwrite --report {tmp / 'r.json'}; choose another path"),
        "label: --output is a folder": ([*label, "--input", str(good), "--output", str(folder)],
                                        f"--output {folder} is a folder; give a file path"),
        "label: --output is --input (a hard link)": (
            [*label, "--input", str(good), "--output", str(linked)],
            f"--output {linked} would overwrite --input {good}; choose another path"),
        "serve: missing model folder": ([*serve[:1], "--model_name_or_path", str(tmp / "no_model"), *serve[3:]],
                                        f"--model_name_or_path: no such model folder: {tmp / 'no_model'} (looked "
                                        f"for {tmp / 'no_model'}); download it first: python "
                                        "scripts/download_model.py --model Qwen/Qwen2.5-7B-Instruct --out "
                                        f"{tmp / 'no_model'}"),
        "serve: missing adapter folder": ([*serve, "--adapter_path", str(tmp / "no_adapter")],
                                          f"{tmp / 'no_adapter'}: no such adapter folder (--adapter_path)"),
        "serve: missing adapter checkpoint": ([*serve, "--adapter_path", str(tmp / "gone.ckpt")],
                                              f"{tmp / 'gone.ckpt'}: no such checkpoint file (--adapter_path)"),
        "serve: max_length under the prompt": (
            [*serve, "--max_length", "20"],
            "--max_length 20 is too small: the prompt without any case text is 105 tokens; raise it"),
        "serve: max_batch_size 0": ([*serve, "--max_batch_size", "0"],
                                    '--max_batch_size: Not of type PositiveInt: 0 does not conform to '
                                    "restriction v>0"),
        "label: the failures file is --input": (
            [*label, "--input", str(failures_named), "--output", str(tmp / "out.jsonl")],
            f"--output's failures file {failures_named} would overwrite --input {failures_named}; choose another path"),
    }  # fmt: skip


REFUSALS = ["fit: empty training file", "fit: empty validation file", "fit: val_fraction takes every record",
            "fit: an id in both train_file and val_file", "fit: val_fraction beside val_file",
            "fit: accumulate_grad_batches 0", "predict: max_length under the prompt", "evaluate: --report is a folder",
            "evaluate: --report is --predictions", "evaluate: --per_record is --references (a hard link)",
            "evaluate: --per_record is --report", "label: --output is a folder",
            "label: --output is --input (a hard link)", "label: the failures file is --input",
            "serve: missing model folder", "serve: missing adapter folder", "serve: missing adapter checkpoint",
            "serve: max_length under the prompt", "serve: max_batch_size 0"]  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_refusal_is_one_line_with_status_2_and_leaves_the_inputs_alone(case, inputs, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HEALTHAI_API_KEY", "sk-test-0123456789")
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    argv, message = refusal_cases(inputs, tmp_path)[case]
    if argv[0] == "serve":  # found before LitServe starts any process (in a model worker it was "workers failed")
        monkeypatch.setattr("litserve.LitServer.run", lambda *a, **k: pytest.fail("the server started"))
        monkeypatch.setattr("healthai.serve._stop_on_sigterm", lambda: None)
    before = {p: p.read_bytes() for p in [*tmp_path.rglob("*.jsonl"), inputs["good"]] if p.is_file()}
    code, err = run_in_process(argv, capfd)
    assert (code, err.rstrip("\n").splitlines()[-1]) == (2, f"healthai {argv[0]}: error: {message}"), err
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in before} == before  # no input was written to


@pytest.mark.parametrize("argv", [["fit", "--config", "configs/qwen_lora.yaml"],
                                  ["predict", "--config", "configs/predict.yaml"],
                                  ["predict", "--config", "configs/baseline.yaml"]])  # fmt: skip
def test_a_gpu_config_on_a_machine_without_a_gpu_is_one_line(argv, capfd, monkeypatch) -> None:
    """#29 item 14: Lightning's "No supported gpu backend found!" was a 39-line traceback."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.backends.mps.is_available", lambda: False)
    code, err = run_in_process(argv, capfd)
    assert (code, err.rstrip("\n").splitlines()[-1]) == (2, (
        f"healthai {argv[0]}: error: trainer.accelerator gpu: the config asks for a GPU and torch finds none on this "
        f"machine; to run {argv[0]} on the CPU pass --trainer.accelerator cpu (with --trainer.precision 32-true for "
        "exact fp32; slow for a 7B model)")), err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["fit", "predict", "serve", "export"])
def test_a_model_folder_that_is_not_there_offline_is_one_line_at_once(command, inputs, tmp_path, capfd, monkeypatch):
    """#29 item 13: `models/Qwen2.5-7B` in a clone with no models/ was taken for a hub id: minutes of retries, then
    transformers' traceback. Offline, no request is made; the line names the option, the folder and the download."""
    monkeypatch.chdir(tmp_path)  # no models/ here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda *a, **k: pytest.fail("the hub was asked"))
    name, train = "models/Qwen2.5-7B", str(inputs["good"])
    argv, option = {
        "fit": (["fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--model.model_name_or_path", name,
                 "--data.train_file", train, "--data.val_file", "null", "--trainer.logger", "false"],
                "model.model_name_or_path"),
        "predict": (["predict", "--config", str(REPO / "configs" / "predict_tiny.yaml"), "--model.model_name_or_path",
                     name, "--data.predict_file", train, "--writer.output_path", str(tmp_path / "p.jsonl")],
                    "model.model_name_or_path"),
        "serve": (["serve", "--model_name_or_path", name, "--device", "cpu"], "--model_name_or_path"),
        "export": (["export", "--adapter", str(inputs["adapter"]), "--out", str(tmp_path / "merged"), "--base", name],
                   "--base"),
    }[command]  # fmt: skip
    if command == "serve":
        monkeypatch.setattr("litserve.LitServer.run", lambda *a, **k: pytest.fail("the server started"))
        monkeypatch.setattr("healthai.serve._stop_on_sigterm", lambda: None)
    code, err = run_in_process(argv, capfd)
    assert (code, err.rstrip("\n").splitlines()[-1]) == (2, (
        f"healthai {command}: error: {option}: no such model folder: {name} (looked for {tmp_path / name}), and the "
        "hub is off (HF_HUB_OFFLINE), so it cannot be fetched as a hub id; download it first: python "
        "scripts/download_model.py --model Qwen/Qwen2.5-7B --out models/Qwen2.5-7B")), err
    assert "Traceback" not in err and "Retrying" not in err


def test_an_unreachable_hub_is_asked_once_briefly(tmp_path, monkeypatch) -> None:
    """Online but without network: one request with a short timeout, then the same one line (#29 item 13)."""
    from healthai.errors import ConfigError
    from healthai.hub import HUB_TIMEOUT_S, check_hub_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def no_network(self, name, timeout=None):
        calls.append((name, timeout))
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", no_network)
    for _ in range(2):  # the data module, then the model: asked once
        with pytest.raises(ConfigError) as err:
            check_hub_model("nowhere/Qwen2.5-0.5B-Instruct", "model.model_name_or_path")
    assert calls == [("nowhere/Qwen2.5-0.5B-Instruct", HUB_TIMEOUT_S)] and HUB_TIMEOUT_S <= 10
    assert str(err.value) == (
        f"model.model_name_or_path: no such model folder: nowhere/Qwen2.5-0.5B-Instruct (looked for "
        f"{tmp_path / 'nowhere/Qwen2.5-0.5B-Instruct'}), and the hub cannot be reached to fetch it as a hub id "
        "(ConnectionError); download it first: python scripts/download_model.py --model "
        "nowhere/Qwen2.5-0.5B-Instruct --out models/Qwen2.5-0.5B-Instruct")


def test_debug_env_var_shows_the_traceback(inputs, capfd, monkeypatch) -> None:
    monkeypatch.setenv("HEALTHAI_DEBUG", "1")
    from healthai.jsonl import BadRecordError

    with pytest.raises(BadRecordError, match=r"GBK_bytes\.jsonl:2: not valid UTF-8"):
        main(["evaluate", "--predictions", str(inputs["good"]), "--references", str(inputs["GBK bytes"])])


def test_bom_is_accepted_everywhere_records_are_read(tmp_path, inputs, capfd) -> None:
    """Excel and Windows tools start a UTF-8 file with a byte order mark: read as if it were not there."""
    from healthai.records import read_records

    rows = labelled_records(2)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    assert [r["id"] for r in read_records(path, labelled=True)] == [r["id"] for r in rows]
    main(["evaluate", "--predictions", str(path), "--references", str(path), "--report", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert (report["n"], report["disease_f1"]) == (2, 1.0)


def test_evaluate_with_empty_references_is_an_error(tmp_path, inputs, capfd) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    code, err = run_in_process(["evaluate", "--predictions", str(inputs["good"]), "--references", str(empty)], capfd)
    assert (code, err) == (2, f"healthai evaluate: error: {empty}: no reference records; nothing to score against\n")


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_repeated_prediction_id_is_one_line_naming_both_lines(command, inputs, capfd) -> None:
    """5 and "5" in a predictions file: once "the first row is used", exit 0 (#29 item 11)."""
    dup, good = inputs["duplicate id"], inputs["good"]
    argv = {"evaluate": ["evaluate", "--predictions", str(dup), "--references", str(good)],
            "compare": ["compare", "--references", str(good), f"a={good}", f"b={dup}"]}[command]  # fmt: skip
    code, err = run_in_process(argv, capfd)
    assert (code, err) == (2, f"healthai {command}: error: {dup}:2: duplicate prediction id '5' (first at {dup}:1 as 5)\n")


def test_ids_5_and_string_5_are_one_record_in_evaluate_and_label_resume(tmp_path, capfd) -> None:
    """The id rule, where it is not an error: evaluate joins "5" to 5, and a label output holding "5" makes 5 done."""
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": 5, "diseases": "高血压", "reason": "r"}])
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"id": "5", "diseases": "高血压", "reason": "r"}])
    main(["evaluate", "--predictions", str(preds), "--references", str(refs), "--report", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert (report["n_predictions"], report["missing"], report["unknown"], report["disease_f1"]) == (1, [], [], 1.0)

    import asyncio

    from healthai.label import LabelSettings, run_labelling

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 5, "feature_content": "主诉: 头痛"}])
    out = write_jsonl(tmp_path / "out.jsonl", [{"id": "5", "feature_content": "主诉: 头痛", "diseases": "d",
                                               "reason": "r"}])  # fmt: skip
    settings = LabelSettings(input=str(src), output=str(out), base_url="http://127.0.0.1:9/v1", model="m",
                             progress=False)  # fmt: skip
    summary = asyncio.run(run_labelling(settings, api_key="sk-test-0123456789"))
    assert (summary.skipped, summary.done, summary.failed) == (1, 0, 0)


def test_shell_sees_status_2_and_one_line_of_stderr(inputs, tmp_path, forkserver) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HEALTHAI_DEBUG", None)
    # The first from a fresh interpreter, as a shell starts it; the second in a process forked from a pre-imported
    # one (tests/forkserver.py): the same exit status and stderr, without a second interpreter start.
    argv = ["-m", "healthai", "evaluate", "--predictions", str(inputs["good"]),
            "--references", str(inputs["torn line"])]  # fmt: skip
    result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        f"healthai evaluate: error: {inputs['torn line']}:2: malformed JSON"
    ), result.stderr
    argv, _ = command_line("fit", "batch size 0", inputs, tmp_path)
    result = forkserver.run(["-m", "healthai", *argv], env=env)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == ('healthai fit: error: data.batch_size: Not of type '
                                              "PositiveInt: 0 does not conform to restriction v>0"), result.stderr
    assert "Traceback" not in result.stderr


# -- option ranges are declared as restricted types in the signatures ------------------------------------------------


@pytest.mark.parametrize("command, option, declared", [
    ("fit", "--data.batch_size", "(type: PositiveInt, default: 4)"),
    ("fit", "--model.warmup_ratio", "(type: ClosedUnitInterval, default: 0.03)"),
    ("fit", "--model.lora_dropout", "(type: HalfOpenUnitInterval, default: 0.05)"),
    ("predict", "--data.eval_batch_size", "(type: Optional[PositiveInt], default: null)"),
    ("predict", "--model.generation.max_new_tokens", "(type: Optional[PositiveInt], default: null)"),
])  # fmt: skip
def test_help_shows_each_options_range(command, option, declared, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    entry = re.search(rf"^  {re.escape(option)} .*?(?=^  -)", help_text, re.MULTILINE | re.DOTALL)
    assert entry is not None, help_text
    assert declared in " ".join(entry.group(0).split())  # the help wraps lines


@pytest.mark.parametrize("argv, message", [
    (["fit", "--data.batch_size", "0"],
     'data.batch_size: Not of type PositiveInt: 0 does not conform to restriction v>0'),
    (["fit", "--model.warmup_ratio", "1.5"],
     'model.warmup_ratio: Not of type ClosedUnitInterval: 1.5 does not conform to restriction v>=0 and '
     "v<=1"),
    (["predict", "--data.val_fraction", "1"],
     'data.val_fraction: Not of type HalfOpenUnitInterval: 1 does not conform to restriction v>=0 and v<1'),
    (["fit", "--model.learning_rate", "inf"], 'model.learning_rate: Not of type NonNegativeFloat: inf is not a finite number'),
    (["fit", "--model.learning_rate", "nan"], 'model.learning_rate: Not of type NonNegativeFloat: nan is not a finite number'),
])  # fmt: skip
def test_a_value_out_of_its_declared_range_is_one_line_naming_the_option(argv, message, capfd, monkeypatch) -> None:
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert capfd.readouterr().err == f"healthai {argv[0]}: error: {message}\n"


@pytest.mark.parametrize("argv", [["fit", "--data.eval_batch_size", "-1"],
                                  ["predict", "--model.generation.max_new_tokens", "0"]])  # fmt: skip
def test_a_value_out_of_range_with_none_allowed_is_one_line_naming_the_option(argv, capfd, monkeypatch) -> None:
    # jsonargparse lists what each member of Optional[...] said; one_line keeps that on one line.
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capfd.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"healthai {argv[0]}: error: {argv[1][2:]}: ") and "PositiveInt" in err, err


def test_classes_built_in_python_check_the_same_declared_ranges(tiny_model_dir) -> None:
    from healthai.data import DiagnosisDataModule
    from healthai.generation import GenerationSettings
    from healthai.errors import ConfigError
    from healthai.label import LabelSettings
    from healthai.model import DiagnosisLoRA

    with pytest.raises(ConfigError, match=r"^data\.val_fraction: Not of type HalfOpenUnitInterval: 1\.0 does not"):
        DiagnosisDataModule(val_fraction=1.0)
    with pytest.raises(ConfigError, match=r"^data\.eval_batch_size: Not of type PositiveInt: 0 does not"):
        DiagnosisDataModule(eval_batch_size=0)
    with pytest.raises(ConfigError, match=r"^generation\.max_new_tokens: Not of type PositiveInt: 0 does not"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ConfigError, match=r"^model\.lora_r: Not of type PositiveInt: True not a number"):
        DiagnosisLoRA(str(tiny_model_dir), lora_r=True)
    with pytest.raises(ConfigError, match=r"^--timeout: Not of type PositiveFloat: 0 does not"):
        LabelSettings(input="i", output="o", base_url="http://x/v1", model="m", timeout=0)
    DiagnosisDataModule(eval_batch_size=None, val_fraction=0.0)  # None where the type is Optional, the range's edge


def test_parsed_values_are_plain_numbers() -> None:
    """A parsed PositiveInt is an int: a model's hyperparameters reach checkpoints and hparams.yaml as plain numbers."""
    import yaml
    from jsonargparse import ArgumentParser

    from healthai.data import DiagnosisDataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DiagnosisDataModule, "data")
    data = parser.instantiate(parser.parse_args(["--data.batch_size", "3", "--data.val_fraction", "0.5"])).data
    assert type(data.hparams["batch_size"]) is int and type(data.hparams["val_fraction"]) is float
    assert yaml.safe_load(yaml.safe_dump(dict(data.hparams)))["batch_size"] == 3  # safe_dump refuses Python objects


# -- the system's refusals: read-only, permission denied, immutable, disk full (#29 item 8) ---------------------------

# An output each command writes, and its option as the error names it. Run as root (chmod does not stop root) the
# read-only case is the system's answer monkeypatched in; a real read-only folder is checked where it can be.
OUTPUT_COMMANDS = {
    "label": "--output", "evaluate": "--report", "compare": "--report", "export": "--out",
    "fit": "trainer.logger (the run folder)",
}  # fmt: skip


def output_argv(command: str, inputs: dict[str, Path], out_dir: Path) -> tuple[list[str], Path]:
    """The argv of ``command`` writing into ``out_dir``, and the output path its error must name."""
    good = str(inputs["good"])
    if command == "label":
        out = out_dir / "labels.jsonl"
        return ["label", "--input", good, "--output", str(out), "--base_url", "http://127.0.0.1:9/v1", "--model",
                "m", "--progress", "false"], out  # fmt: skip
    if command == "evaluate":
        out = out_dir / "report.json"
        return ["evaluate", "--predictions", good, "--references", good, "--report", str(out)], out
    if command == "compare":
        out = out_dir / "report.json"
        return ["compare", "--references", good, f"a={good}", f"b={good}", "--report", str(out)], out
    if command == "export":
        out = out_dir / "merged"
        return ["export", "--adapter", str(inputs["adapter"]), "--out", str(out), "--records", good], out
    argv, _ = command_line("fit", "good", inputs, out_dir)
    return argv + ["--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.save_dir",
                   str(out_dir), "--trainer.logger.name", "run"], out_dir / "run" / "version_0"  # fmt: skip


def refuse_writes_in(folder: Path, code: int, monkeypatch) -> None:
    """Make the system refuse, with ``code``, every file created in ``folder`` (as a read-only mount would)."""
    import tempfile

    real = tempfile.TemporaryFile

    def temporary_file(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise OSError(code, os.strerror(code), str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr("healthai.paths.tempfile.TemporaryFile", temporary_file)


READ_ONLY, DENIED = (30, "read-only file system"), (13, "permission denied")
IMMUTABLE = (1, "operation not permitted (an immutable or append-only file or folder?)")


@pytest.mark.parametrize("command, code, cause", [
    *[(command, *READ_ONLY) for command in OUTPUT_COMMANDS], ("evaluate", *DENIED), ("label", *IMMUTABLE),
])  # fmt: skip
def test_an_unwritable_output_is_refused_before_any_work(command, code, cause, inputs, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HEALTHAI_API_KEY", "sk-test-0123456789")
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    folder = tmp_path / "out"
    folder.mkdir()
    argv, out = output_argv(command, inputs, folder)
    refuse_writes_in(folder, code, monkeypatch)
    # Nothing heavy may start: no model load (export merged for 27 s before it found out), no request, no scoring.
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    for module in ("healthai.compare", "healthai.evaluate"):  # compare's own name first: it imports evaluate's
        monkeypatch.setattr(f"{module}.score", lambda *a, **k: pytest.fail("scored"))
    monkeypatch.setattr("healthai.label.run_workers", lambda *a, **k: pytest.fail("labelled"))
    code_, err = run_in_process(argv, capfd)
    option = OUTPUT_COMMANDS[command]
    assert (code_, err.splitlines()[-1]) == (2, f"healthai {command}: error: {option} {out}: cannot write in {folder} "
                                                f"({cause})"), err  # fmt: skip
    assert "Traceback" not in err
    assert sorted(folder.iterdir()) == []  # nothing created


def test_fit_without_a_logger_checks_its_default_root_dir(inputs, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    argv, _ = command_line("fit", "good", inputs, tmp_path)  # --trainer.logger false, default_root_dir tmp_path
    refuse_writes_in(tmp_path, 30, monkeypatch)
    code, err = run_in_process(argv, capfd)
    assert (code, err.splitlines()[-1]) == (2, f"healthai fit: error: trainer.default_root_dir {tmp_path}: cannot "
                                               f"write in {tmp_path} (read-only file system)"), err  # fmt: skip


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder; the case above covers it")
def test_a_real_read_only_folder_is_refused(inputs, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        argv, out = output_argv("evaluate", inputs, folder)
        code, err = run_in_process(argv, capfd)
    finally:
        folder.chmod(0o755)
    assert (code, err) == (2, f"healthai evaluate: error: --report {out}: cannot write in {folder} (permission "
                              "denied)\n")  # fmt: skip


def disk_full(*args, **kwargs):
    """A write on a full disk: the system names no file."""
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("command, where", [
    ("evaluate", "healthai.evaluate.write_text"), ("compare", "healthai.evaluate.write_text"),
    ("export", "healthai.export._merge_save_compare"), ("label", "healthai.label.run_workers"),
])  # fmt: skip
def test_a_full_disk_is_one_line_naming_the_file(command, where, inputs, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HEALTHAI_API_KEY", "sk-test-0123456789")
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    argv, out = output_argv(command, inputs, tmp_path)
    monkeypatch.setattr(where, disk_full)
    code, err = run_in_process(argv, capfd)
    assert (code, err.splitlines()[-1]) == (2, f"healthai {command}: error: {out}: no space left on the device"), err
    assert "Traceback" not in err


def test_an_unreadable_input_is_one_line_naming_it(inputs, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    refs = inputs["good"]

    def denied(path, *args, **kwargs):  # chmod 000 does not stop root: the system's answer, as a user would get it
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("healthai.jsonl.open", denied, raising=False)  # the module's name is found before the builtin
    code, err = run_in_process(["evaluate", "--predictions", str(refs), "--references", str(refs)], capfd)
    assert (code, err) == (2, f"healthai evaluate: error: {refs}: permission denied\n")


# -- inputs that are not files, and files that are not JSON Lines (#29 items 9, 14) ------------------------------------


def odd_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """``case → (path, what the error says after the path)``."""
    folder = tmp / "a_folder"
    folder.mkdir()
    fifo = tmp / "a_fifo"
    os.mkfifo(fifo)
    loop_a, loop_b = tmp / "loop_a", tmp / "loop_b"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    dangling = tmp / "dangling"
    dangling.symlink_to(tmp / "gone.jsonl")
    rows = labelled_records(2)
    array = tmp / "array.json"
    array.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    csv_file = tmp / "records.csv"
    csv_file.write_text("id,feature_content,diseases,reason\n1,头痛,高血压,r\n", encoding="utf-8")
    jsonl = "expected JSON Lines (one JSON object per line), but the file looks like"
    return {
        "folder": (folder, ": a folder, not a file of records"),
        "FIFO": (fifo, ": a named pipe (FIFO), not a file of records"),
        "/dev/null": (Path("/dev/null"), ": a character device (such as /dev/null), not a file of records"),
        "symlink loop": (loop_a, ": a loop of symbolic links, not a file"),
        "dangling link": (dangling, f": a symbolic link to {tmp / 'gone.jsonl'}, which does not exist"),
        "JSON array": (array, f":1: {jsonl} a JSON array"),
        "CSV": (csv_file, f":1: {jsonl} CSV (first line: 'id,feature_content,diseases,reason')"),
    }


def odd_input_argv(command: str, path: Path, inputs: dict[str, Path], tmp: Path) -> list[str]:
    """The argv reading ``path`` as ``command``'s records."""
    good = str(inputs["good"])
    if command == "label":
        return ["label", "--input", str(path), "--output", str(tmp / "out.jsonl"), "--base_url",
                "http://127.0.0.1:9/v1", "--model", "m", "--on_bad_record", "skip"]  # fmt: skip
    if command == "evaluate":
        return ["evaluate", "--predictions", good, "--references", str(path)]
    if command == "compare":
        return ["compare", "--references", good, f"a={good}", f"b={path}"]
    return ["export", "--adapter", str(inputs["adapter"]), "--out", str(tmp / "m"), "--records", str(path)]


@pytest.mark.parametrize("command", ["label", "evaluate", "compare", "export"])
@pytest.mark.parametrize("case", ["folder", "FIFO", "/dev/null", "symlink loop", "dangling link", "JSON array", "CSV"])
def test_an_input_that_is_not_a_records_file_says_what_it_is(command, case, inputs, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HEALTHAI_API_KEY", "sk-test-0123456789")
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    path, what = odd_inputs(tmp_path)[case]
    argv = odd_input_argv(command, path, inputs, tmp_path)
    code, err = run_in_process(argv, capfd)
    # label names its option before a link loop: the output rule resolves --input first (healthai/errors.py).
    named = f"--input {path}" if (command, case) == ("label", "symlink loop") else str(path)
    assert (code, err.splitlines()[-1]) == (2, f"healthai {command}: error: {named}{what}"), err
    assert "Traceback" not in err


def test_fit_reads_training_records_through_the_same_check(inputs, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    path, what = odd_inputs(tmp_path)["CSV"]
    code, err = run_in_process(fit_argv(inputs, tmp_path, "--data.train_file", str(path)), capfd)
    assert (code, err.splitlines()[-1]) == (2, f"healthai fit: error: {path}{what}"), err


# -- the command line itself (#29 items 12, 14) ------------------------------------------------------------------------


@pytest.mark.parametrize("typed, line", [
    ("fti", "healthai: error: unknown command 'fti'; did you mean fit? (commands: fit, validate, predict, label, "
            "evaluate, compare, synonyms, export, serve)"),
    ("evalute", "healthai: error: unknown command 'evalute'; did you mean evaluate? (commands: fit, validate, "
                "predict, label, evaluate, compare, synonyms, export, serve)"),
    ("zzz", "healthai: error: unknown command 'zzz' (commands: fit, validate, predict, label, evaluate, compare, "
            "synonyms, export, serve)"),
])  # fmt: skip
def test_a_mistyped_command_is_status_2_with_the_nearest_name(typed, line, capfd):
    assert run_in_process([typed, "--help"], capfd) == (2, line + "\n")


def test_ctrl_c_during_label_start_up_is_status_130_without_a_traceback(inputs, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HEALTHAI_API_KEY", "sk-test-0123456789")
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Reading the input is start-up: the run's own SIGINT handling (summary, resume line) is not installed yet.
    monkeypatch.setattr("healthai.label.read_cases", interrupted)
    argv, _ = output_argv("label", inputs, tmp_path)
    try:
        result = run_in_process(argv, capfd)
    except KeyboardInterrupt:  # what the shell showed as a traceback; caught here so pytest itself is not stopped
        pytest.fail("KeyboardInterrupt escaped the entry point")
    assert result == (130, "healthai label: interrupted\n")


def test_devices_0_is_one_line_naming_the_option(inputs, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    code, err = run_in_process(fit_argv(inputs, tmp_path, "--trainer.devices", "0"), capfd)
    assert (code, err.splitlines()[-1]) == (2, "healthai fit: error: trainer.devices 0: give a number of devices of 1 "
                                               "or more, -1 (all), a list of device indices such as [0, 1], or auto")
    assert "Traceback" not in err


@pytest.mark.parametrize("case", ["cuda without a GPU", "port in use"])
def test_serve_refuses_before_announcing_its_address(case, inputs, capfd, monkeypatch):
    import socket

    monkeypatch.delenv("HEALTHAI_DEBUG", raising=False)
    monkeypatch.setattr("litserve.LitServer.run", lambda *a, **k: pytest.fail("the server started"))
    monkeypatch.setattr("healthai.serve._stop_on_sigterm", lambda: None)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # a GPU machine runs this test as a CPU one
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        device = "cuda" if case == "cuda without a GPU" else "cpu"
        argv = ["serve", "--model_name_or_path", str(inputs["model"]), "--device", device, "--port", str(port)]
        with pytest.raises(SystemExit) as info:
            main(argv)
    out, err = capfd.readouterr()
    message = {"cuda without a GPU": "--device cuda: no CUDA GPU is visible on this machine; use --device cpu --dtype "
                                     "float32 (or --device auto, which picks a GPU when there is one)",
               "port in use": f"--port {port}: already in use on 127.0.0.1 (another server, or an earlier serve still "
                              "running); stop it or choose another --port"}[case]  # fmt: skip
    assert (info.value.code, err) == (2, f"healthai serve: error: {message}\n")
    assert "serve: http" not in out
