#!/usr/bin/env bash
# The whole loop on a fresh machine, on CPU: set up .venv, build the small offline model, fit it on the sample
# records, predict the validation records with the adapter, evaluate the predictions, then predict them again with the
# base model alone (zero-shot) and compare the two: side by side, the F1 difference with its bootstrap interval, and an
# HTML report. (The small model has random weights: its difference is noise, and the interval says so.)
HEALTHAI_EXTRAS=${HEALTHAI_EXTRAS:-tiny,report}  # report: matplotlib, for compare --html
. "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

python -m healthai fit --config configs/tiny.yaml --trainer.enable_progress_bar false
run=$(ls -td checkpoints/tiny/version_* | head -n 1)
# The caps fit trained for (configs/tiny.yaml), not predict_tiny's short test caps: answers are not cut short. Both
# predictions below decode with them, so the comparison differs in the adapter alone.
decoding=(--model.generation.max_new_tokens 460 --model.generation.max_diseases_chars 32
  --model.generation.max_reason_chars 192)
python -m healthai predict --config configs/predict_tiny.yaml "${decoding[@]}" \
  --model.adapter_path "$run/adapter" --writer.output_path "$run/predictions.jsonl"
python -m healthai evaluate --predictions "$run/predictions.jsonl" --references data/sample_val.jsonl \
  --report "$run/eval_report.json"
# The same predict path without --model.adapter_path is the zero-shot base model.
python -m healthai predict --config configs/predict_tiny.yaml "${decoding[@]}" --writer.output_path "$run/zero_shot.jsonl"
python -m healthai compare --references data/sample_val.jsonl \
  "zero-shot=$run/zero_shot.jsonl" "tuned=$run/predictions.jsonl" \
  --report "$run/compare.json" --html "$run/report.html"

echo
echo "run folder:   $run"
echo "adapter:      $run/adapter"
echo "predictions:  $run/predictions.jsonl (zero-shot: $run/zero_shot.jsonl)"
echo "reports:      $run/eval_report.json, $run/compare.json"
echo "HTML report:  $run/report.html (open it in a browser)"
echo "TensorBoard:  .venv/bin/tensorboard --logdir checkpoints/tiny"
