"""A command prints its own lines, not third-party noise (:mod:`healthai.quiet`). ``--verbose`` or
``HEALTHAI_DEBUG=1`` brings the noise back.

``fit`` and a zero-shot ``predict`` run as real processes, forked from a pre-imported interpreter
(tests/forkserver.py), loading their tokenizer from its files. That interpreter imported bitsandbytes before the commands ran, so bitsandbytes' message
about the `kernels` hub can only show in a fresh interpreter: one imports bitsandbytes the way a command's model load
does, and ends as an interpreter ends.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, labelled_records, write_jsonl
from healthai.quiet import DEBUG_ENV_VAR, VERBOSE_ENV_VAR, take_verbose_flag, verbose_from_environment

NOISE = {
    "kernels hub": "Failed to load CPU gemm_4bit_forward",
    "litlogger tip": "[litlogger](",
    "litmodels tip": "[litmodels](",
    "is_gradient_checkpointing": "`is_gradient_checkpointing` is deprecated",
    "LeafSpec": "`isinstance(treespec, LeafSpec)` is deprecated",
    "no seed": "No seed found",
    "seed 0": "Seed set to 0",
    "FLOPs": "FLOPs",
    "PEFT's count": "trainable params:",
}
"""Each known noise, by a distinctive piece of its text."""


def quiet_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (DEBUG_ENV_VAR, VERBOSE_ENV_VAR)}
    return {**env, "PYTHONPATH": str(REPO)}


def noise_in(text: str) -> list[str]:
    return [name for name, piece in NOISE.items() if piece in text]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quiet")
    return {"train": write_jsonl(folder / "train.jsonl", labelled_records(2)),
            "val": write_jsonl(folder / "val.jsonl", labelled_records(2, offset=2))}  # fmt: skip


def predict_argv(tiny_model_dir, records, out) -> list[str]:
    """A zero-shot predict of two records (no --model.adapter_path): the base model alone."""
    return ["-m", "healthai", "predict", "--config", "configs/predict_tiny.yaml",
            "--model.model_name_or_path", str(tiny_model_dir), "--data.predict_file", str(records["val"]),
            "--data.max_length", "256", "--model.generation.max_new_tokens", "16",
            "--writer.output_path", str(out)]  # fmt: skip


def test_fit_and_a_zero_shot_predict_print_none_of_the_known_noise(tmp_path, tiny_model_dir, records, forkserver):
    runs = str(tmp_path / "runs")
    fit = forkserver.run(["-m", "healthai", "fit", "--config", "configs/tiny.yaml",
                          "--model.model_name_or_path", str(tiny_model_dir), "--data.train_file", str(records["train"]),
                          "--data.val_file", str(records["val"]), "--trainer.max_epochs", "1",
                          "--data.batch_size", "2", "--data.max_length", "256",
                          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", runs,
                          "--trainer.logger.init_args.save_dir", runs, "--trainer.callbacks.dirpath", f"{runs}/ckpt"],
                         env=quiet_env(), preloaded=False)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    # fit's own lines stay: PEFT's count of the weights that train (it is fit's), the parameter table, the adapter.
    assert "Trainable params" in fit.stdout and "Total params" in fit.stdout and "adapter saved to" in fit.stderr
    assert noise_in(fit.stderr) == [] and noise_in(fit.stdout) == ["PEFT's count"], fit.stdout + fit.stderr

    predict = forkserver.run(predict_argv(tiny_model_dir, records, tmp_path / "pred.jsonl"), env=quiet_env(),
                             preloaded=False)  # as a fresh process: whatever loading the tokenizer prints
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert "wrote 2 prediction(s)" in predict.stdout
    assert noise_in(predict.stdout + predict.stderr) == [], predict.stdout + predict.stderr


@pytest.mark.parametrize("verbose", [None, "--verbose", DEBUG_ENV_VAR])
def test_verbose_or_debug_shows_the_noise_again(tmp_path, verbose, forkserver):
    """A fit refused at start (``--ckpt_path last`` with no checkpoint) after Lightning built its Trainer, which is
    when Lightning logs its litlogger tip: quiet by default; with --verbose or HEALTHAI_DEBUG=1 the tip is back (the
    quietness test above can fail)."""
    runs = str(tmp_path / "runs")
    argv = ["-m", "healthai", "fit", "--config", "configs/tiny.yaml", "--ckpt_path", "last",
            "--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs,
            "--trainer.callbacks.dirpath", f"{runs}/ckpt"]  # fmt: skip
    env = quiet_env()
    if verbose == "--verbose":
        argv.insert(3, verbose)
    elif verbose is not None:
        env[verbose] = "1"
    result = forkserver.run(argv, env=env)
    assert result.returncode != 0 and "no last.ckpt" in result.stderr, result.stderr[-3000:]  # debug: a traceback
    assert noise_in(result.stderr) == ([] if verbose is None else ["litlogger tip"]), result.stderr


def test_a_fresh_commands_imports_print_neither_the_kernels_hub_message_nor_leak_reports_at_exit(tmp_path):
    """In a fresh interpreter, as a command's first model load does. A filter of the test's own, added before
    quiet's, sees what bitsandbytes logged. Where bitsandbytes tries the hub (CPUs with AVX512-BF16), the test checks
    that the message was emitted and then dropped; elsewhere it checks only that stderr is clean.

    The command's libraries load as ``python -m healthai`` loads them (:func:`healthai.__main__.libraries_loading`):
    without garbage collection, then frozen out of the collector's sight; an in-process caller's are left alone. At
    the interpreter's end they are collectable again: left frozen, nanobind (triton's bindings, which bitsandbytes
    imports) would report its objects as leaked on stderr."""
    code = (
        "import gc, logging\n"
        "seen = []\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').addFilter(lambda r: seen.append(r.getMessage()) or True)\n"
        "from healthai import quiet\n"
        "from healthai.__main__ import libraries_loading\n"
        "quiet.install()\n"
        "with libraries_loading(own_process=False):\n"
        "    untouched = gc.isenabled()\n"
        "with libraries_loading(own_process=True):\n"
        "    collecting = gc.isenabled()\n"
        "    import bitsandbytes\n"
        "print(untouched, collecting, gc.isenabled(), gc.get_freeze_count() > 100_000)\n"
        "print(sum('gemm_4bit_forward' in m for m in seen))\n"
    )  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=quiet_env(), capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == "True False True True", result.stdout
    assert NOISE["kernels hub"] not in result.stderr and "leaked" not in result.stderr, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) in (0, 1)  # 1 where bitsandbytes logged it: emitted, and dropped


@pytest.mark.parametrize("argv, rest, verbose", [
    (["fit", "--verbose", "--config", "c.yaml"], ["fit", "--config", "c.yaml"], True),
    (["--verbose", "evaluate"], ["evaluate"], True),
    (["compare", "--references", "r", "--verbose", "a.jsonl"], ["compare", "--references", "r", "a.jsonl"], True),
    # Lightning's own option of validate (print the results table) takes a value: it is left to Lightning.
    (["validate", "--verbose", "false"], ["validate", "--verbose", "false"], False),
    (["validate", "--verbose=true"], ["validate", "--verbose=true"], False),
])  # fmt: skip
def test_the_verbose_flag_is_taken_out_of_the_command_line(argv, rest, verbose):
    assert take_verbose_flag(argv) == (rest, verbose)


@pytest.mark.parametrize("env, verbose", [
    ({}, False), ({DEBUG_ENV_VAR: "1"}, True), ({DEBUG_ENV_VAR: "0"}, False), ({VERBOSE_ENV_VAR: "1"}, True),
])  # fmt: skip
def test_the_environment_can_ask_for_everything(env, verbose):
    assert verbose_from_environment(env) is verbose
