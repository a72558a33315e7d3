"""Every YAML under configs/ parses against the code (configs cannot rot) and opens with the command that runs it;
the per-size family (configs/qwen2.5-*/) agrees with each Qwen2.5 size's architecture and carries a reproducible
memory estimate."""

from __future__ import annotations

import dataclasses
import contextlib
import importlib.util
import io
import json
import re
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from healthai.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
COMMAND = re.compile(r"^# python -m healthai (fit|validate|predict) --config (configs/\S+\.yaml)")

# Qwen2.5-{size}-Instruct as published (config.json of each): layers, hidden, intermediate, attention heads, KV heads,
# tied input/output embeddings, vocabulary. Written here, not read from anywhere: the test must hold without a download.
QWEN25 = {
    "0.5B": (24, 896, 4864, 14, 2, True, 151936),
    "1.5B": (28, 1536, 8960, 12, 2, True, 151936),
    "3B": (36, 2048, 11008, 16, 2, True, 151936),
    "7B": (28, 3584, 18944, 28, 4, False, 152064),
    "14B": (48, 5120, 13824, 40, 8, False, 152064),
    "32B": (64, 5120, 27648, 40, 8, False, 152064),
}
# Total parameters as the model cards round them.
CARD_PARAMS = {"0.5B": 0.49e9, "1.5B": 1.54e9, "3B": 3.09e9, "7B": 7.61e9, "14B": 14.7e9, "32B": 32.5e9}
QLORA_SIZES = {"14B", "32B"}
DECODER_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
FAMILY = sorted(c for c in CONFIGS if c.parent.name.startswith("qwen2.5-"))


def rel(config: Path) -> str:
    return config.relative_to(REPO).as_posix()


@cache
def resolved(path: str, command: str = "fit") -> dict:
    """The config as the real CLI resolves it (every default filled in): ``--print_config``, no model loaded."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--config", str(REPO / path), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


@cache
def estimate_memory():
    spec = importlib.util.spec_from_file_location("estimate_memory", REPO / "scripts" / "estimate_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module


def size_and_kind(config: Path) -> tuple[str, str]:
    """``configs/qwen2.5-14b/qlora.yaml`` → ``("14B", "qlora")``."""
    size = config.parent.name.removeprefix("qwen2.5-").upper()
    assert size in QWEN25, f"{rel(config)}: unknown size folder"
    return size, config.stem


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def test_there_are_configs():
    assert {"tiny.yaml", "qwen_lora.yaml", "predict.yaml", "predict_tiny.yaml", "baseline.yaml"} <= {
        c.name for c in CONFIGS
    }


@pytest.mark.parametrize("config", CONFIGS, ids=rel)
def test_config_parses_with_its_command(config):
    first = config.read_text(encoding="utf-8").splitlines()[0]
    match = COMMAND.match(first)
    assert match, f"{rel(config)} must open with '# python -m healthai <command> --config {rel(config)}'"
    command, path = match.groups()
    assert path == rel(config)
    printed = resolved(path, command)
    assert "model_name_or_path" in printed["model"] and "data" in printed
    if command == "predict":
        assert "output_path" in printed["writer"]


def test_the_family_has_every_size_and_qlora_for_the_large_ones():
    assert [rel(c) for c in FAMILY] == sorted(
        [f"configs/qwen2.5-{s.lower()}/lora.yaml" for s in QWEN25]
        + [f"configs/qwen2.5-{s.lower()}/qlora.yaml" for s in QLORA_SIZES]
    )


def test_architecture_facts_agree_with_the_published_7b_config_and_the_estimate_script():
    published = json.loads((REPO / "scripts" / "qwen2.5-7b-instruct" / "config.json").read_text())
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "tie_word_embeddings", "vocab_size")  # fmt: skip
    assert tuple(published[k] for k in keys) == QWEN25["7B"]
    archs = estimate_memory().ARCHS
    assert {size: tuple(vars(a).values()) for size, a in archs.items()} == QWEN25
    for size, arch in archs.items():  # the script's parameter count reproduces the model cards
        assert arch.params() == pytest.approx(CARD_PARAMS[size], rel=0.01), size


def lora_params(size: str, r: int, targets: list[str]) -> int:
    """LoRA parameters, counted here from the architecture: r·(in + out) per adapted linear per layer."""
    layers, h, i, heads, kv_heads, _, _ = QWEN25[size]
    kv = h // heads * kv_heads
    shape = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
             "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip
    return layers * sum(r * sum(shape[t]) for t in targets)


@pytest.mark.parametrize("config", FAMILY, ids=rel)
def test_size_config_agrees_with_its_architecture(config):
    size, kind = size_and_kind(config)
    cfg = resolved(rel(config))
    model, data, trainer = cfg["model"], cfg["data"], cfg["trainer"]
    assert model["model_name_or_path"] == f"Qwen/Qwen2.5-{size}-Instruct"
    # LoRA goes on the decoder's linear projections only; with tied embeddings (0.5B-3B) the LM head *is* the input
    # embedding, so nothing may ask to train or save it separately
    targets = model["target_modules"]
    assert targets and set(targets) <= DECODER_LINEARS, targets
    tied = QWEN25[size][5]
    if tied:
        dumped = json.dumps(cfg)
        assert "lm_head" not in dumped and "embed_tokens" not in dumped and "modules_to_save" not in dumped
    assert model["quantization"] == ("nf4" if kind == "qlora" else None)
    assert kind == "lora" or size in QLORA_SIZES
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed" and model["dtype"] == "bfloat16"
    # one run folder per config: `--ckpt_path last` must never resume another size's checkpoint
    run = f"qwen2.5-{size.lower()}-{kind}"
    assert trainer["logger"]["init_args"]["name"] == run
    dirs = {c["init_args"].get("dirpath") for c in trainer["callbacks"] if "ModelCheckpoint" in c["class_path"]}
    assert dirs == {f"checkpoints/{run}/checkpoints"}

    # The header's memory estimate: for this file's max_length × batch, this architecture, and reproducible.
    text = config.read_text(encoding="utf-8")
    shape = re.search(r"^# Estimated peak GPU memory: [\d.]+ GB at max_length (\d+) × batch (\d+) ", text, re.M)
    assert shape, f"{rel(config)}: no estimate line"
    assert (int(shape[1]), int(shape[2])) == (data["max_length"], data["batch_size"])
    assert "An estimate, not a measurement" in text and "python scripts/estimate_memory.py" in text
    em = estimate_memory()
    params = em.ARCHS[size].params()
    assert f"base {params / 1e9:.2f}B params" in text
    assert f"LoRA r{model['lora_r']} {lora_params(size, model['lora_r'], targets) / 1e6:.1f}M params" in text
    expected = em.comment_block(em.Settings.from_config(cfg))
    assert em.current_block(text) == expected, (
        f"{rel(config)}: stale estimate; run python scripts/estimate_memory.py --write {rel(config)}"
    )


def test_qwen_lora_yaml_is_the_7b_config():
    """configs/qwen_lora.yaml (the design's name) and configs/qwen2.5-7b/lora.yaml are the same recipe, kept in two
    files because LightningCLI has no include; a change to one must be made to the other."""
    design, family = resolved("configs/qwen_lora.yaml"), resolved("configs/qwen2.5-7b/lora.yaml")

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(design), flat(family)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    assert not differ, f"configs/qwen_lora.yaml and configs/qwen2.5-7b/lora.yaml differ at {differ}"


def test_the_docs_table_shows_each_configs_estimate():
    readme = (REPO / "docs" / "fit.md").read_text(encoding="utf-8")
    config_7b = (REPO / "configs" / "qwen2.5-7b" / "lora.yaml").read_text(encoding="utf-8")
    peak_7b = re.search(r"^# Estimated peak GPU memory: ([\d.]+) GB", config_7b, re.M)[1]
    assert f"estimated peak {peak_7b} GB" in (REPO / "README.md").read_text(encoding="utf-8")  # the 7B recipe's line
    for config in FAMILY:
        peak = re.search(r"^# Estimated peak GPU memory: ([\d.]+) GB", config.read_text(encoding="utf-8"), re.M)[1]
        row = next((line for line in readme.splitlines() if f"--config {rel(config)}`" in line), None)
        assert row is not None, f"docs/fit.md's config table has no row for {rel(config)}"
        assert f"**{peak} GB**" in row, f"docs/fit.md shows a stale estimate for {rel(config)}: {row}"


@pytest.mark.parametrize("config", ["configs/qwen_lora.yaml", "configs/qwen2.5-14b/lora.yaml",
                                    "configs/qwen2.5-32b/lora.yaml"])  # fmt: skip
def test_fsdp_overlay_shards_a_model_config_and_keeps_its_settings(config):
    """configs/qwen_lora_fsdp.yaml layered over a model config: the sharded strategy (FSDP2, not Lightning's FSDP1
    strategy, which cannot train a bf16 base with fp32 LoRA) and bf16-mixed, with the model config's base, sizes and
    clipping kept."""
    alone = resolved(config)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / config), "--config", str(REPO / "configs/qwen_lora_fsdp.yaml"),
                  "--print_config"])  # fmt: skip
    both = yaml.safe_load(out.getvalue())
    assert both["trainer"]["strategy"]["class_path"] == "healthai.sharding.LoRAFSDPStrategy"
    assert both["trainer"]["precision"] == "bf16-mixed" and both["trainer"]["devices"] == -1
    assert both["model"] == alone["model"] and both["data"] == alone["data"]
    assert both["trainer"]["gradient_clip_val"] == alone["trainer"]["gradient_clip_val"] == 1.0


def test_the_predict_configs_batch_is_the_80_gb_row_of_the_computed_kv_cache_table():
    # #30 item 6: docs/predict.md's card table, recomputed here from the published 7B architecture (QWEN25): bf16
    # weights, per row the KV cache of max_length + budget tokens and the prefill's one-layer transient, 1 GB of CUDA
    # context, rounded down to a multiple of 16. The predict configs use the 80 GB row.
    layers, h, i, heads, kv_heads, _, _ = QWEN25["7B"]
    weights = estimate_memory().ARCHS["7B"].params() * 2  # counted from the architecture (checked against QWEN25)
    kv_token = layers * kv_heads * (h // heads) * 2 * 2
    assert kv_token == 57_344
    text = (REPO / "docs" / "predict.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) GB \| \*\*(\d+)\*\* \| ([\d.]+) GB \| ([\d.]+) GB \| ([\d.]+) GB \|$", text, re.M)
    assert [int(card) for card, *_ in rows] == [24, 40, 48, 80, 141]
    for config in ("configs/predict.yaml", "configs/baseline.yaml"):
        data, model = resolved(config, "predict")["data"], resolved(config, "predict")["model"]
        budget = model["generation"]["max_new_tokens"] or 1024  # null: the adapter's, 1024 zero-shot
        kv_row, prefill_row = kv_token * (data["max_length"] + budget), data["max_length"] * (4 * h + 3 * i) * 2
        for card, batch, kv, prefill, total in rows:
            fits = int((int(card) * 1e9 - 1e9 - weights) // (kv_row + prefill_row)) // 16 * 16
            assert int(batch) == fits, card
            assert (kv, prefill) == (f"{fits * kv_row / 1e9:.1f}", f"{fits * prefill_row / 1e9:.1f}"), card
            assert total == f"{(weights + fits * (kv_row + prefill_row)) / 1e9:.1f}", card
        assert data["eval_batch_size"] == int(dict((c, b) for c, b, *_ in rows)["80"]) == 128, config


def test_estimate_per_gpu_under_fsdp_and_what_qlora_holds(capsys):
    # #32 item 4, #30 item 7: the numbers, counted here by hand from the 0.5B's architecture (24 layers, hidden 896,
    # KV 128, MLP 4864, tied 151,936-row embeddings) and the 14B's (hidden 5120, vocabulary 152,064).
    em = estimate_memory()
    small = em.Settings.from_config(resolved("configs/qwen2.5-0.5b/lora.yaml"))
    one, two = em.estimate(small), em.estimate(small, gpus=2)
    assert (one["weights"], one["lora"], one["gathered"]) == (494032768 * 2, 8798208 * 16, 0)
    assert (two["weights"], two["lora"]) == (494032768, 8798208 * 8)  # the shards: half each
    # Gathered whole: the (tied) embeddings and 3 decoder layers (7 projections, q/k/v biases, two norms), bf16.
    layer = 2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864 + (896 + 2 * 128) + 2 * 896
    assert two["gathered"] == (151936 * 896 + 3 * layer) * 2 == 361743616
    assert (two["train"], two["validation"]) == (one["train"], one["validation"])  # a GPU's own batch: not divided
    assert two["peak"] == 494032768 + 8798208 * 8 + 361743616 + one["validation"] == 4919139456
    qlora = em.Settings.from_config(resolved("configs/qwen2.5-14b/qlora.yaml"))
    arch, q = em.ARCHS["14B"], em.estimate(qlora)
    # nf4 linears, fp32 embeddings/head/norms/biases, and the loss's bf16 copy of the fp32 head (healthai.loss).
    assert q["weights"] == arch.decoder_linear_params() * em.NF4_BYTES + arch.other_params() * 4 + 152064 * 5120 * 2
    bf16_residual = em.estimate(dataclasses.replace(qlora, quantization=None))["train"]
    # fp32 residual, 2 more bytes a value: the 48 kept layer inputs of the 2048 x 2 tokens, and the recomputed layer's
    # two norm outputs (counted twice, for the gradients through it).
    assert q["train"] - bf16_residual == 48 * 4096 * 5120 * 2 + 2 * 4096 * 2 * 5120 * 2
    assert em.main(["--gpus", "2", str(REPO / "configs/qwen2.5-0.5b/lora.yaml")]) == 0
    assert "per GPU under FSDP on 2 GPUs: 4.9 GB (weights shard 0.5 GB" in capsys.readouterr().out
    # A 4-bit base is not sharded; a GPU count under 1 is a mistake: one line each, exit 2.
    assert em.main(["--gpus", "2", str(REPO / "configs/qwen2.5-14b/qlora.yaml")]) == 2
    assert capsys.readouterr().err.strip().endswith("--gpus: a 4-bit (QLoRA) base cannot be sharded by FSDP; "
                                                    "estimate its one-GPU peak")  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        em.main(["--gpus", "0", str(REPO / "configs/qwen2.5-0.5b/lora.yaml")])
    assert exit_info.value.code == 2 and "--gpus must be 1 or more, got 0" in capsys.readouterr().err
