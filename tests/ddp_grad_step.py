"""One optimizer step of ``DiagnosisLoRA`` on CPU, in 1 process or several gloo DDP processes; saves the step's LoRA
gradient (as the optimizer sees it) and each rank's answer-token count. Run by tests/test_distributed.py:

    python tests/ddp_grad_step.py MODEL_DIR TRAIN_JSONL DEVICES BATCH_SIZE ACCUMULATE OUT_DIR

A script, not a test function: Lightning's DDP launcher starts the other ranks by running this command again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from healthai.data import DiagnosisDataModule
from healthai.model import DiagnosisLoRA


class GradProbe(DiagnosisLoRA):
    def on_before_optimizer_step(self, optimizer) -> None:
        tokens = int(self._step_tokens)  # this rank's answer tokens in the step, before the hook resets the count
        super().on_before_optimizer_step(optimizer)
        grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "tokens": tokens}, Path(sys.argv[6]) / f"rank{self.global_rank}.pt")


def main() -> None:
    model_dir, train, devices, batch_size, accumulate, _ = sys.argv[1:]
    L.seed_everything(0)
    model = GradProbe(model_dir, dtype="float32", lora_dropout=0.0, gradient_checkpointing=False,
                      generate_every_n_epochs=0)  # fmt: skip
    data = DiagnosisDataModule(train_file=train, tokenizer_path=model_dir, val_fraction=0, max_length=160,
                               batch_size=int(batch_size))  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=int(devices), strategy="ddp" if int(devices) > 1 else "auto",
                        precision="32-true", max_steps=1, accumulate_grad_batches=int(accumulate), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=sys.argv[6])  # fmt: skip
    trainer.fit(model, data)


if __name__ == "__main__":
    main()
