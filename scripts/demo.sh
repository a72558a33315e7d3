#!/usr/bin/env bash
# The whole loop on a fresh machine, on CPU: set up .venv, build the small offline model, fit it on the sample
# records, predict the validation records with the adapter, evaluate the predictions, then predict them again with the
# base model alone (zero-shot) and compare the two: side by side, the F1 difference with its bootstrap interval, and an
# HTML report. (The small model has random weights: its difference is noise, and the interval says so.)
HEALTHAI_EXTRAS=${HEALTHAI_EXTRAS:-tiny,report}  # report: matplotlib, for compare --html
. "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

python -m healthai fit --config configs/tiny.yaml --trainer.enable_progress_bar false
run=$(ls -td checkpoints/tiny/version_* | head -n 1)
# predict_tiny.yaml leaves the answer's token budget null: the adapter's, the one fit trained for (configs/tiny.yaml).
python -m healthai predict --config configs/predict_tiny.yaml \
  --model.adapter_path "$run/adapter" --writer.output_path "$run/predictions.jsonl"
python -m healthai evaluate --predictions "$run/predictions.jsonl" --references data/sample_val.jsonl \
  --report "$run/eval_report.json"
# The same predict path without --model.adapter_path is the zero-shot base model.
# The same budget as the adapter's (configs/tiny.yaml's 192, not the zero-shot default of 1024), so the two predictions
# differ in the adapter alone.
python -m healthai predict --config configs/predict_tiny.yaml --model.generation.max_new_tokens 192 \
  --writer.output_path "$run/zero_shot.jsonl"
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
