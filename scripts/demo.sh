#!/usr/bin/env bash
# The whole loop on a fresh machine, on CPU: set up .venv, build the small offline model, fit it on the sample
# records, predict the validation records with the adapter, and evaluate the predictions.
. "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

python -m healthai fit --config configs/tiny.yaml --trainer.enable_progress_bar false
run=$(ls -td checkpoints/tiny/version_* | head -n 1)
# The caps fit trained for (configs/tiny.yaml), not predict_tiny's short test caps: answers are not cut short.
python -m healthai predict --config configs/predict_tiny.yaml \
  --model.generation.max_new_tokens 460 --model.generation.max_diseases_chars 32 --model.generation.max_reason_chars 192 \
  --model.adapter_path "$run/adapter" --writer.output_path "$run/predictions.jsonl"
python -m healthai evaluate --predictions "$run/predictions.jsonl" --references data/sample_val.jsonl \
  --report "$run/eval_report.json"

echo
echo "run folder:   $run"
echo "adapter:      $run/adapter"
echo "predictions:  $run/predictions.jsonl"
echo "report:       $run/eval_report.json"
echo "TensorBoard:  .venv/bin/tensorboard --logdir checkpoints/tiny"
