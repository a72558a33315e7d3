#!/usr/bin/env bash
# The whole loop on a fresh machine, on CPU (70 s on 2 idle cores): set up .venv, build the small offline model, fit
# it (configs/demo.yaml) on the first 6 records of data/sample_train.jsonl until it has memorised them, predict with
# the adapter (tuned) and with the base model alone (zero-shot), evaluate, and compare the two on two sets of records:
#   - memorisation check: the 6 records the adapter trained on. The adapter writes their answers back, which shows that
#     training, loss masking, prompt and decoding agree end to end. It says nothing about unseen records.
#   - held-out: the 10 records of data/sample_val.jsonl, never trained on. The small model has random weights and
#     6 records teach it nothing that carries over: expect 0 for both, and an interval that says so.
# Then the losses (TensorBoard's, as text) and a closing summary of both comparisons.
HEALTHAI_EXTRAS=${HEALTHAI_EXTRAS:-tiny,report}  # report: matplotlib, for compare --html
. "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

runs=checkpoints/demo
trained=$runs/trained_records.jsonl
heldout=data/sample_val.jsonl
mkdir -p "$runs"
head -n 6 data/sample_train.jsonl >"$trained"

python -m healthai fit --config configs/demo.yaml --data.train_file "$trained" --trainer.enable_progress_bar false
run=$(ls -td "$runs"/version_* | head -n 1)  # the newest run folder: the one fit just wrote
# The answer's token budget fit checked the labels against and saved with the adapter (configs/demo.yaml's):
# predict_tiny.yaml leaves it null, so the tuned runs take it; the zero-shot runs are given the same.
budget=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["max_new_tokens"])' \
  "$run/adapter/answer_budget.json")

predict() {  # predict OUTPUT [options]: both sets of records in one batch, configs/predict_tiny.yaml, no progress
  python -m healthai predict --config configs/predict_tiny.yaml --data.predict_file "$runs/records.jsonl" \
    --data.eval_batch_size 16 --writer.output_path "$1" --writer.progress false "${@:2}"
}
cat "$trained" "$heldout" >"$runs/records.jsonl"
echo
echo "Predicting the 16 records, tuned (with the adapter) and zero-shot (the same predict without it), both with the"
echo "adapter's answer budget of $budget tokens, so the two differ in the adapter alone. An answer the model does not"
echo "close itself is closed by that budget and marked 'truncated'. Tuned answers to the trained records should close"
echo "themselves. A random base closes almost none, and the adapter loses its way on some records it never saw:"
echo "predict's advice to raise the budget is for real models; no budget helps a random one."
predict "$run/all_tuned.jsonl" --model.adapter_path "$run/adapter"
predict "$run/all_zero_shot.jsonl" --model.generation.max_new_tokens "$budget"
# Each set's rows in a file of its own, for evaluate and compare: trained_tuned.jsonl, trained_zero_shot.jsonl, and
# for the held-out records predictions.jsonl, zero_shot.jsonl.
python - "$trained" "$heldout" "$run" <<'EOF'
import json
import sys
from pathlib import Path

trained, heldout, run = sys.argv[1], sys.argv[2], Path(sys.argv[3])
sets = [(trained, "trained_tuned", "trained_zero_shot"), (heldout, "predictions", "zero_shot")]
for records, tuned, zero_shot in sets:
    ids = {json.loads(line)["id"] for line in open(records, encoding="utf-8")}
    for name, source in [(tuned, "all_tuned"), (zero_shot, "all_zero_shot")]:
        rows = (run / f"{source}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        (run / f"{name}.jsonl").write_text("".join(r for r in rows if json.loads(r)["id"] in ids), encoding="utf-8")
EOF
python -m healthai evaluate --predictions "$run/predictions.jsonl" --references "$heldout" \
  --report "$run/eval_report.json"

echo
echo "=== memorisation check: the records the adapter trained on ($trained) ==="
python -m healthai compare --references "$trained" \
  "zero-shot=$run/trained_zero_shot.jsonl" "tuned=$run/trained_tuned.jsonl" \
  --report "$run/compare_trained.json" --html "$run/report_trained.html"
echo
echo "=== held-out (unseen) records ($heldout) ==="
python -m healthai compare --references "$heldout" \
  "zero-shot=$run/zero_shot.jsonl" "tuned=$run/predictions.jsonl" \
  --report "$run/compare.json" --html "$run/report.html"

echo
echo "run folder:   $run"
echo "adapter:      $run/adapter"
echo "predictions:  $run/all_tuned.jsonl, all_zero_shot.jsonl; per set: trained_tuned.jsonl, trained_zero_shot.jsonl,"
echo "              predictions.jsonl, zero_shot.jsonl (held-out)"
echo "reports:      $run/compare_trained.json, compare.json, eval_report.json"
echo "HTML reports: $run/report_trained.html, report.html (open them in a browser)"
echo "TensorBoard:  .venv/bin/tensorboard --logdir $runs"
echo
echo "=== losses: train/loss on the 6 trained records, val/loss on the 10 held-out ones ==="
python scripts/print_losses.py "$run"
echo
echo "=== summary: zero-shot vs tuned ==="
python - "$run/compare_trained.json" "$run/compare.json" <<'EOF'
import json
import sys

sets = ["memorisation check (records it trained on)", "held-out (unseen) records"]
print(f"{'zero-shot -> tuned':43} {'records':>7}  {'disease F1':<12}  {'difference, 95% interval':<24}  "
      f"{'reason ROUGE-L':<14}  truncated")
for label, path in zip(sets, sys.argv[1:]):
    report = json.load(open(path, encoding="utf-8"))
    zero, tuned = report["systems"]["zero-shot"], report["systems"]["tuned"]
    (pair,) = report["pairs"]  # tuned - zero-shot, paired bootstrap over the records
    f1 = f"{zero['disease_f1']:.2f} -> {tuned['disease_f1']:.2f}"
    diff = f"{pair['difference']:+.2f} [{pair['ci_low']:+.2f}, {pair['ci_high']:+.2f}]"
    rouge = f"{zero['reason_rougeL']:.2f} -> {tuned['reason_rougeL']:.2f}"
    cut = f"{zero['parse_status']['truncated']} -> {tuned['parse_status']['truncated']}"
    print(f"{label:43} {tuned['n']:>7}  {f1:<12}  {diff:<24}  {rouge:<14}  {cut}")

trained = json.load(open(sys.argv[1], encoding="utf-8"))["systems"]["tuned"]
if trained["disease_f1"] < 0.8 or trained["parse_status"]["truncated"]:
    sys.exit("The adapter did not write back the answers it trained on: training, loss masking, prompt and decoding "
             "disagree somewhere, or this machine needs more steps (configs/demo.yaml's max_epochs).")
print("The first row checks the plumbing: the adapter writes back the answers it trained on (a memorisation check,\n"
      "not a claim about unseen records). The second is the real test, and a random-weight model trained on 6 records\n"
      "has nothing for it. On a real base (configs/qwen_lora.yaml) the held-out row is the one that matters.")
EOF
