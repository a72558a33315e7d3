"""configs/qwen_lora_fsdp.yaml (FSDP2 through ``healthai.sharding.LoRAFSDPStrategy``) on CPU with 2 gloo processes, as
a user smoke-tests it before renting GPUs: training matches one plain process, ``--ckpt_path last`` resumes exactly,
checkpoints hold the adapter only, and the adapter predicts and exports. One process (world size 1) is run by
scripts/gpu_check.py's FSDP item (tests/test_gpu_check.py)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, labelled_records, read_jsonl, seed_records, write_jsonl


CLIP = "1e-6"
"""AdamW's update does not depend on a gradient's scale, except through its eps (1e-8): clipping to a norm this small
makes the per-element gradients comparable to eps, so the trained weights depend on the norm clipping computed — a
norm taken over each rank's shard only (not the whole sharded gradient) would change them."""


def fit_args(tmp_path, tiny_model_dir, train, val, root: str, batch_size: int, steps: int, overlay=()) -> list[str]:
    """configs/tiny.yaml, then ``overlay`` (config and options), then this test's sizes and folders."""
    return [
        "fit", "--config", "configs/tiny.yaml", *overlay, "--model.model_name_or_path", str(tiny_model_dir),
        "--data.train_file", str(train), "--data.val_file", str(val), "--data.max_length", "256",
        "--data.batch_size", str(batch_size), "--data.eval_batch_size", "2", "--trainer.max_steps", str(steps),
        "--trainer.max_epochs", "10", "--trainer.gradient_clip_val", CLIP, "--trainer.enable_progress_bar", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.default_root_dir", str(tmp_path / root),
        "--trainer.logger.init_args.save_dir", str(tmp_path / root), "--trainer.callbacks.dirpath",
        str(tmp_path / root / "ckpt"), "--model.val_generate_limit", "2",
    ]  # fmt: skip


def adapter_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_trains_resumes_and_saves_an_adapter_only_checkpoint(
    tmp_path, tiny_model_dir, monkeypatch, forkserver
):
    from healthai.cli import cli_main
    from healthai.export import export

    # 16 records, 2 ranks x batch 2 = the global batches of one process x batch 4 (the samplers build the same):
    # 4 steps per epoch. A checkpoint every 2 steps; the step-2 one, put back as last.ckpt (what a run killed after
    # step 2 leaves), is resumed with --ckpt_path last: a resume inside an epoch, with the same step count as planned.
    # Its step-4 checkpoint is compared with the uninterrupted run's: weights, AdamW state, learning rate.
    train = write_jsonl(tmp_path / "train.jsonl", labelled_records(16))
    val = write_jsonl(tmp_path / "val.jsonl", labelled_records(4, offset=20))
    # fp32 (32-true) so that the comparison with one process is tight; validation generates (all ranks in step).
    fsdp = ["--config", "configs/qwen_lora_fsdp.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.precision", "32-true", "--model.generate_every_n_epochs", "1",
            "--model.generation.max_new_tokens", "112"]  # fmt: skip
    every_2 = ["--trainer.callbacks.every_n_train_steps", "2", "--trainer.callbacks.save_top_k", "-1"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    ckpts = tmp_path / "fsdp" / "ckpt"
    for run, extra in enumerate((every_2, [*every_2, "--ckpt_path", "last"])):
        args = fit_args(tmp_path, tiny_model_dir, train, val, "fsdp", 2, 4, [*fsdp, *extra])
        if run == 0:  # as a user runs it: one process, whose strategy (Lightning's launcher) starts the second rank
            result = forkserver.run(["-m", "healthai", *args], env=env, timeout=600)  # the second: a fresh interpreter
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        else:  # both ranks forked, without an interpreter start each (tests/forkserver.py)
            result = forkserver.run_ranks(["-m", "healthai", *args], nprocs=2)[0]
        if run == 0:  # the checkpoint the resume starts from: LoRA weights and their AdamW state only
            (step_2,) = ckpts.glob("*step=2*.ckpt")
            ckpt = torch.load(step_2, map_location="cpu", weights_only=False)
            assert ckpt["global_step"] == 2 and ckpt["state_dict"]
            assert all(".lora_A." in k or ".lora_B." in k for k in ckpt["state_dict"])
            (optimizer,) = ckpt["optimizer_states"]
            assert sorted(optimizer["state"]) == list(range(len(ckpt["state_dict"])))  # positions, as a plain run
            base_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
            assert step_2.stat().st_size < base_bytes / 20  # no base weight: well under the 78 MB base
            (step_4,) = ckpts.glob("*step=4*.ckpt")
            uninterrupted_state = torch.load(step_4, map_location="cpu", weights_only=False)
            for stale in ckpts.glob("*.ckpt"):
                if stale != step_2:
                    stale.unlink()  # so that the checkpoints after the resume are the resumed run's own
            shutil.copy(step_2, ckpts / "last.ckpt")
            # The resume continues in this run's folder (healthai.run_folder): its adapter is rewritten there.
            uninterrupted = adapter_weights(tmp_path / "fsdp" / "tiny" / "version_0" / "adapter")
    assert "Restored all states from the checkpoint" in result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "fsdp" / "tiny").iterdir()) == ["version_0"]
    sharded = tmp_path / "fsdp" / "tiny" / "version_0" / "adapter"
    resumed = adapter_weights(sharded)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.allclose(resumed[key], uninterrupted[key], rtol=1e-6, atol=1e-8), key
    # Not only the weights: AdamW's state (moments and step count of every LoRA weight) and the schedule at step 4
    # are the uninterrupted run's (a resume that dropped the optimizer state could still land near its weights).
    (step_4,) = ckpts.glob("*step=4*.ckpt")  # the resumed run's own (the first run's was removed before it)
    resumed_state = torch.load(step_4, map_location="cpu", weights_only=False)
    assert resumed_state["global_step"] == uninterrupted_state["global_step"] == 4
    assert resumed_state["lr_schedulers"] == uninterrupted_state["lr_schedulers"]
    # Every rank's shard (#32 item 5): the step-4 checkpoint is gathered from both ranks' shards, so a resume that put
    # back rank 0's shard alone (as adapter-only FSDP2 saves elsewhere do) would leave rank 1's rows of every LoRA
    # weight and moment at their fresh values and fail the comparisons above and below. And the saved adapter/ is
    # that gathered full adapter, bit for bit, in whole shapes (not one rank's rows).
    gathered = {k[len("model."):].replace(".default.", "."): v for k, v in resumed_state["state_dict"].items()}
    assert gathered.keys() == resumed.keys()
    for key in resumed:
        assert torch.equal(resumed[key], gathered[key]), key
    (before,), (after,) = uninterrupted_state["optimizer_states"], resumed_state["optimizer_states"]
    assert [g["lr"] for g in after["param_groups"]] == [g["lr"] for g in before["param_groups"]]
    assert sorted(after["state"]) == sorted(before["state"]) == list(range(len(resumed_state["state_dict"])))
    for i, state in before["state"].items():
        assert float(after["state"][i]["step"]) == float(state["step"]) == 4.0, i
        for moment in ("exp_avg", "exp_avg_sq"):  # tiny values (the gradients are clipped to 1e-6): relative only
            torch.testing.assert_close(after["state"][i][moment], state[moment], rtol=1e-5, atol=0,
                                       msg=f"{moment} of parameter {i}")  # fmt: skip

    # The same 4 steps in one plain process (in-process, one thread as the ranks had).
    monkeypatch.chdir(REPO)  # the config's relative paths
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cli_main(fit_args(tmp_path, tiny_model_dir, train, val, "plain", 4, 4, ["--model.generate_every_n_epochs", "0"]))
    finally:
        torch.set_num_threads(threads)
    plain = adapter_weights(tmp_path / "plain" / "tiny" / "version_0" / "adapter")
    got = uninterrupted
    assert got.keys() == plain.keys()
    moved = sum(float(v.abs().sum()) for k, v in plain.items() if "lora_B" in k)
    assert moved > 0  # lora_B starts at zero: the steps trained
    for key in plain:
        assert got[key].shape == plain[key].shape, key  # the full tensors, gathered from both ranks
        assert torch.allclose(got[key], plain[key], rtol=1e-4, atol=1e-6), key

    # The checkpoint and the adapter are ordinary ones: predict applies the last .ckpt, export merges the adapter
    # folder (and checks the merge by generating).
    records = write_jsonl(tmp_path / "records.jsonl", seed_records(2, offset=40))
    cli_main(["predict", "--config", "configs/predict_tiny.yaml", "--model.model_name_or_path", str(tiny_model_dir),
              "--model.adapter_path", str(ckpts / "last.ckpt"), "--data.predict_file", str(records), "--writer.progress", "false",
              "--model.generation.max_new_tokens", "16", "--writer.output_path", str(tmp_path / "pred.jsonl")])
    assert [r["id"] for r in read_jsonl(tmp_path / "pred.jsonl")] == [r["id"] for r in read_jsonl(records)]
    summary = export(adapter=sharded, out=tmp_path / "merged", parity_records=1)
    assert (tmp_path / "merged" / "model.safetensors").is_file(), summary


def test_fsdp_refuses_a_quantized_base_before_loading_it(tmp_path, tiny_model_dir, monkeypatch):
    # FSDP2 cannot shard bitsandbytes' 4-bit weights: one clear line at start, before a process group or any weight.
    from healthai.cli import cli_main
    from healthai.errors import ConfigError

    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"^model.quantization \(QLoRA\) cannot be sharded by .*LoRAFSDPStrategy"):
        cli_main(["fit", "--config", "configs/tiny.yaml", "--config", "configs/qwen_lora_fsdp.yaml",
                  "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--model.quantization", "nf4",
                  "--model.dtype", "bfloat16", "--model.model_name_or_path", str(tiny_model_dir),
                  "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert not torch.distributed.is_initialized()


def test_the_fsdp_strategy_evaluates_under_no_grad_not_inference_mode():
    # #30 item 8: FSDP2's unshard under inference_mode; Lightning switches to no_grad for FSDP1 only.
    import lightning as L

    from healthai.sharding import evaluate_under_no_grad

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert trainer.validate_loop.inference_mode and trainer.predict_loop.inference_mode
    evaluate_under_no_grad(trainer)
    assert not any(loop.inference_mode for loop in (trainer.validate_loop, trainer.test_loop, trainer.predict_loop))


@pytest.mark.slow
def test_sharded_generation_gathers_once_per_call_and_answers_as_the_unsharded_model(tmp_path, tiny_model_dir,
                                                                                     forkserver):  # fmt: skip
    # #30 item 3: 2 gloo ranks (tests/fsdp_generate.py), each generating its own prompts (of different lengths) with a
    # trained LoRA, unsharded and then sharded. Before: every decoding step re-gathered every unit (12 new tokens x 4
    # units per call) with the ranks stepping in lockstep; now one gather per unit per call, the same tokens.
    import json

    from fsdp_generate import NEW_TOKENS

    forkserver.run_ranks(["tests/fsdp_generate.py", str(tiny_model_dir), str(tmp_path)], nprocs=2, timeout=120)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        texts, truncated, lengths = got["plain"]
        assert lengths == [NEW_TOKENS, NEW_TOKENS] and all(texts), got  # the random model ran the whole budget
        assert got["sharded"] == [got["plain"]] * 2, rank  # token for token (fp32, the same weights)
        assert got["units"] == 4  # 2 decoder layers, the LM head, the decoder
        assert got["gathers"] == [4, 4], got["gathers"]  # once per unit per call, not per token
        assert got["resharded"] and got["settings_kept"], got
