#!/usr/bin/env bash
# The whole loop on a fresh machine, on CPU: set up .venv, build the small offline model, fit it on the sample
# records, predict the validation records with the adapter, and evaluate the predictions.
. "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

python -m healthai fit --config configs/tiny.yaml --trainer.enable_progress_bar false
run=$(ls -td checkpoints/tiny/version_* | head -n 1)
python -m healthai predict --config configs/predict_tiny.yaml \
  --model.adapter_path "$run/adapter" --writer.output_path "$run/predictions.jsonl"
python -m healthai evaluate --predictions "$run/predictions.jsonl" --references data/sample_val.jsonl \
  --report "$run/eval_report.json"

echo
echo "run folder:   $run"
echo "adapter:      $run/adapter"
echo "predictions:  $run/predictions.jsonl"
echo "report:       $run/eval_report.json"
echo "TensorBoard:  .venv/bin/tensorboard --logdir checkpoints/tiny"
