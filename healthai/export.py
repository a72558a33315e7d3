"""``python -m healthai export``: merge a LoRA adapter into its base model for serving, and check the merge.

vLLM (and any plain transformers user) serves a single model folder fastest; a base + adapter pair needs LoRA support
at serving time and is slower. Merging is a one-off rewrite ``W ← W + (alpha / r) · B A`` of every adapted weight, so
it can silently go wrong (a wrong base, a dtype that rounds the update away, a broken PEFT version). The export
therefore compares the logits of base + adapter with the logits of the merged folder *as reloaded from disk* on a few
real case records, and exits with status 1 when they differ by more than a tolerance.
"""

from __future__ import annotations

import gc
import importlib.resources
import json
import sys
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from healthai.adapter import Adapter
from healthai.atomic import atomic_folder
from healthai.generation import GenerationSettings, resolve_budget
from healthai.encoding import end_of_turn_id, fit_case_text
from healthai.errors import NonNegativeFloat, PositiveInt, UserError, check_declared, check_model_source, check_output
from healthai.jsonl import BadRecordError, iter_jsonl
from healthai.paths import check_writable, naming
from healthai.prompts import PromptStyle
from healthai.records import check_record

PARITY_RECORDS = "static/parity_records.jsonl"
"""The parity check's records when ``--records`` is not given: the case texts of the repository's
data/sample_val.jsonl, shipped as package data (setup.cfg), so that a non-editable install has them too."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DEFAULT_TOLERANCE = {"float32": 1e-3, "float16": 0.25, "bfloat16": 1.0}
"""Largest accepted max |logit difference| between base + adapter and the reloaded merged model, per dtype.

A wrong merge (wrong base, adapter skipped, wrong scaling) moves logits by about the adapter's own effect, which
for a trained adapter is whole units; the export prints that effect next to the difference. A correct merge differs
only by rounding, because ``x W + s (x A) B`` and ``x (W + s B A)`` round at different places:

* float32: exact enough for a strict check. Measured on the tiny test model: 9.6e-5 on logits up to ~13 (both the
  merged and the unmerged float32 logits are ~5e-5 from a float64 computation, i.e. this is float32 rounding
  amplified by its random weights); 1e-3 leaves room for a 28-layer model.
* float16 / bfloat16: keep 11 / 8 significant bits, so rounding alone moves a logit near 30 by ~0.02 / ~0.1 per
  step, and differences grow through the layers. These bounds are sanity checks, not proofs, and are not yet measured
  on Qwen2.5-7B. The tiny test model's random weights amplify rounding so much that a correct bf16 merge of it
  differs by 1.7 (fp16: 0.19), no more than its unmerged bf16 logits differ from float32 (1.7; fp16: 0.30).
  For a tight check export in float32 and let the server cast (``vllm serve OUT --dtype bfloat16``).

Pass ``--tolerance`` to tighten or loosen this for a given model.
"""


# -- inputs -----------------------------------------------------------------------------------------------------------


def default_records_file() -> Path:
    """The package's own parity records (:data:`PARITY_RECORDS`), found through the package, not the repository."""
    return Path(str(importlib.resources.files("healthai").joinpath(PARITY_RECORDS)))


def first_records(path: Path, n: int) -> list[dict[str, Any]]:
    """The first ``n`` usable records of a JSONL file.

    Only the lines needed are read, so a bad line far down a large file does not stop an export; a bad line among
    the first ones does (naming ``file:line``), since a silent skip would make the check cover fewer records.
    """
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"{path}: no such file (pass --records FILE.jsonl)")
    records: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}  # id (as text: 5 and "5" are one id) -> its line
    for line_no, obj, error in iter_jsonl(path):
        if len(records) == n:
            break
        error = error or check_record(obj, labelled=False)
        if error is None and str(obj["id"]) in first_line:  # a repeated id compares one record twice (#29 item 12)
            error = f"id {obj['id']!r} repeats line {first_line[str(obj['id'])]}"
        if error is not None:
            raise BadRecordError(path, line_no, error)
        first_line[str(obj["id"])] = line_no
        records.append(obj)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def parity_inputs(
    tokenizer, prompt: PromptStyle, records: list[dict[str, Any]], max_tokens: int
) -> list[torch.Tensor]:
    """Prompt ids, exactly as training and predict build them, of each record, cut to at most ``max_tokens``.

    The cap bounds memory: the reference logits are kept while the model is merged, and each position holds a whole
    vocabulary row (152k floats, 0.6 MB).
    """
    return [torch.tensor([fit_case_text(tokenizer, prompt, r["feature_content"], max_tokens)[0]]) for r in records]


# -- models -----------------------------------------------------------------------------------------------------------


def load_model(path: str | Path, dtype: torch.dtype, device: str):
    """A causal LM from ``path`` in ``dtype`` on ``device``, in eval mode (no dropout in the comparison)."""
    from transformers import AutoModelForCausalLM

    # device_map puts weights straight on the GPU (no CPU copy of a 15 GB model); transformers 4 needs accelerate
    # for it, so the CPU default does without.
    placement = {} if device == "cpu" else {"device_map": device}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement).eval()


@torch.no_grad()
def logits_of(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits per input, one record at a time (no padding that could differ between the two models), on the CPU."""
    return [_logits(model, ids) for ids in inputs]


@torch.no_grad()
def max_abs_diff(model, inputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Largest absolute difference between ``model``'s logits and ``reference``, record by record (so only one
    record's logits exist at a time besides the reference)."""
    return max(float((_logits(model, ids) - ref).abs().max()) for ids, ref in zip(inputs, reference, strict=True))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits[0].float().cpu()


def save_merged(model, tokenizer, prompt: PromptStyle, out: Path, generation: GenerationSettings) -> None:
    """Write the merged weights (safetensors), tokenizer, generation config and ``prompt.json`` to ``out``.

    ``generation_config.json`` is the project's decoding settings (:meth:`GenerationSettings.serving_config`), not
    the base's (Qwen's samples at temperature 0.7 with repetition_penalty 1.05): vLLM and ``generate`` take their
    defaults from it. ``prompt.json`` is not read by servers; it sits there so whoever calls the served model can
    build the prompt the adapter was trained on (``PromptStyle.load(out)``).
    """
    out.mkdir(parents=True, exist_ok=True)
    # safe_serialization is the default (and the only format) in transformers 5; 4.x needs it spelled out.
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    prompt.save(out)
    eot = end_of_turn_id(tokenizer)
    config = generation.serving_config([eot, tokenizer.pad_token_id], tokenizer.pad_token_id,
                                       getattr(model.config, "bos_token_id", None))  # fmt: skip
    # Written as JSON rather than through GenerationConfig.save_pretrained, which refuses a greedy config that sets
    # temperature 0 — the value vLLM needs to decode greedily.
    (out / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def check_out_folder(out: Path, overwrite: bool, inputs: dict[str, Any]) -> None:
    """Raise ValueError unless ``out`` may be written: not one of the ``inputs`` (option → path or hub id) nor a
    folder holding one (``--overwrite`` would delete it) — the rule of every command, :func:`check_output` — and
    empty unless ``overwrite``."""
    from healthai.provenance import resolve_model_dir

    # A hub id stands for its folder in the local cache (None when it is not there: nothing to overwrite).
    check_output("--out", out, {option: resolve_model_dir(str(value)) if option == "--base" and value is not None
                                else value for option, value in inputs.items()}, folder=True)  # fmt: skip
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty; pass --overwrite true to replace its contents, or choose "
                         "another folder")  # fmt: skip


def release_memory() -> None:
    """Return freed model memory before loading the next model, so peak memory stays at about one model."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the command ------------------------------------------------------------------------------------------------------


def export(
    adapter: Path,
    out: Path,
    base: Optional[str] = None,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    tolerance: Optional[NonNegativeFloat] = None,
    parity_records: PositiveInt = 3,
    records: Optional[Path] = None,
    parity_max_tokens: PositiveInt = 256,
    device: str = "cpu",
    generation: GenerationSettings = GenerationSettings(),
    allow_base_mismatch: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merge a LoRA adapter into its base model and save one servable folder (safetensors), checked for parity.

    Loads the base, applies the adapter, computes logits on the first --parity_records case records (prompts built
    with the adapter's saved prompt.json and tokenizer; an adapter without prompt.json: the default prompt, with a
    warning), merges, saves the merged model with tokenizer, generation
    config and prompt.json, reloads the saved folder and compares logits. Exits with status 1 when the largest
    absolute logit difference is above --tolerance (the folder is then left in place but must not be served).

    Args:
        adapter: An adapter/ folder written by fit (adapter_config.json, adapter_model.safetensors, tokenizer,
            prompt.json, base.json), e.g. checkpoints/qwen2.5-7b-lora/version_0/adapter, or one of fit's checkpoints
            (.ckpt).
        out: Folder to write the merged model to (created if missing), e.g. models/healthai-merged.
        base: Base model (hub id or local folder). Default: the one the adapter records (base.json; its absolute
            folder when the recorded relative path is not found from here). A base whose fingerprint differs from
            the recorded one is refused.
        dtype: Dtype to load, merge and save in. float32 gives a tight parity check (use it on CPU); bfloat16 halves
            the folder and is what a GPU serves, at the cost of a looser check.
        tolerance: Largest accepted max |logit difference|. Default per dtype: float32 1e-3 (a correct merge
            differs only by rounding; a wrong one by about the adapter's effect, whole units), float16 0.25,
            bfloat16 1.0 (half precision rounds too coarsely for a tight bound: export in float32 for a tight
            check and let vLLM cast with --dtype bfloat16).
        parity_records: Number of case records the parity check runs on.
        records: JSONL of case records {"id", "feature_content"} for the parity check. Default: ten made-up case
            records shipped with the package (those of the repository's data/sample_val.jsonl).
        parity_max_tokens: Longest prompt (tokens) of a parity record; longer case texts are cut at the end.
            Bounds the memory of the kept reference logits (~0.6 MB per token with Qwen's vocabulary).
        device: Where to load and run the models: cpu, cuda, cuda:1, ...
        generation: Decoding settings written to the merged folder's generation_config.json, which vLLM and
            ``generate`` use as defaults. Give the same ``--generation.*`` as predict (default: predict's defaults,
            greedy, no repetition penalty, and max_new_tokens the answer budget fit saved with the adapter).
        allow_base_mismatch: Merge even into a base whose fingerprint differs from the one the adapter was trained
            on.
        overwrite: Replace a non-empty --out folder whole, once the new export passed its parity check, so no file
            of an earlier export (an old model.safetensors.index.json, other shards) is left next to the new one. Never allowed
            for the base model's or the adapter's folder, or a folder holding them.

    Returns:
        ``out``, ``base``, ``dtype``, ``max_abs_diff``, ``tolerance``, ``adapter_effect`` (max |logit change| the
        adapter causes), ``records`` (the ids checked) and ``tokens``.
    """
    check_declared(export, locals(), "--")  # the CLI checks these too; this is for Python callers
    out = Path(out)
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    from transformers import AutoTokenizer

    try:
        lora = Adapter.open(adapter, "--adapter")
        # --base, or the base the adapter records (its absolute folder when the recorded relative path is gone)
        base_name = lora.resolve_base(base, "--base")
        check_model_source(base_name, "--base")  # a missing folder, not transformers' "Repo id must be in the form"
        records_file = Path(records) if records is not None else default_records_file()
        parity_set = first_records(records_file, parity_records)
    except (FileNotFoundError, ValueError) as e:  # BadRecordError is a ValueError
        raise UserError(str(e)) from None
    prompt = lora.prompt  # the rule every command follows (Adapter)
    # A null budget is the one fit trained the adapter for: a server reading generation_config.json must not cut
    # answers the adapter was trained to write.
    generation = resolve_budget(generation, lora.budget)
    lora.check_base(base_name, allow_base_mismatch, "--allow_base_mismatch")
    try:
        check_out_folder(out, overwrite, {"--adapter": lora.path, "--base": base_name, "--records": records_file})
    except ValueError as e:
        raise UserError(str(e)) from None
    # Before the tokenizer and the models load: an unwritable --out was found after 27 s of merging (#29 item 8).
    check_writable("--out", out, folder=True)

    # The adapter's tokenizer (saved by fit, the one it was trained with), else the base's.
    tokenizer = AutoTokenizer.from_pretrained(lora.tokenizer_source(base_name))
    inputs = parity_inputs(tokenizer, prompt, parity_set, parity_max_tokens)

    # Written into a temporary folder beside --out, renamed over it only once the parity check passed (#29 item 6): a
    # full disk, a kill or a failed check leaves the previous --out as it was (with --overwrite, replaced whole).
    with naming(out), atomic_folder(out) as staging:  # naming: a full disk says where (#29 item 8)
        effect, diff = _merge_save_compare(lora, staging, base_name, DTYPES[dtype], device, inputs, tokenizer, prompt,
                                           generation)  # fmt: skip
        tokens = sum(ids.shape[1] for ids in inputs)
        print(f"parity: max |logits(base + adapter) - logits(merged)| = {diff:.3g} over {len(inputs)} records "
              f"({tokens} tokens), tolerance {tolerance:g}; the adapter itself moves logits by up to {effect:.3g}")
        if effect == 0.0:
            print("export: warning: the adapter does not change the base model's logits on these records (an "
                  "untrained adapter?); the merged model equals the base", file=sys.stderr)  # fmt: skip
        if not diff <= tolerance:  # also catches NaN
            print(f"export: error: the merged model does not reproduce base + adapter (max abs logit difference "
                  f"{diff:.3g} > tolerance {tolerance:g}); do not serve it: it is discarded, {out} is left as it was",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(1)
    _print_next_steps(out, dtype)
    return {"out": str(out), "base": base_name, "dtype": dtype, "max_abs_diff": diff, "tolerance": tolerance,
            "adapter_effect": effect, "records": [r["id"] for r in parity_set], "tokens": tokens}  # fmt: skip


def _merge_save_compare(
    adapter: Adapter, out: Path, base: str, dtype: torch.dtype, device: str, inputs: list[torch.Tensor], tokenizer,
    prompt: PromptStyle, generation: GenerationSettings,
) -> tuple[float, float]:
    """Merge, save and compare; returns ``(adapter effect, merge difference)`` as max absolute logit differences
    (base + adapter vs the base; base + adapter vs the merged model reloaded from ``out``).

    The reference logits are taken before ``merge_and_unload``, which rewrites the base weights in place.
    """
    model = adapter.apply(load_model(base, dtype, device)).eval()
    expected = logits_of(model, inputs)
    with model.disable_adapter():
        effect = max_abs_diff(model, inputs, expected)
    merged = model.merge_and_unload()
    save_merged(merged, tokenizer, prompt, out, generation)
    del model, merged  # the merged weights are on disk now; what is compared is the copy reloaded from there
    release_memory()
    reloaded = load_model(out, dtype, device)
    diff = max_abs_diff(reloaded, inputs, expected)
    del reloaded
    release_memory()
    return effect, diff


def _print_next_steps(out: Path, dtype: str) -> None:
    # A float32 folder is twice the size a GPU needs; vLLM casts it at load time.
    cast = " --dtype bfloat16" if dtype == "float32" else ""
    print(f"merged model saved to {out}")
    print("serve it with vLLM (OpenAI-compatible API):")
    print(f"  vllm serve {out} --served-model-name healthai{cast}")
    print("then query it with any OpenAI-compatible client, e.g.:")
    print("  python -m healthai label --base_url http://localhost:8000/v1 --model healthai --input IN.jsonl "
          "--output OUT.jsonl")  # fmt: skip
