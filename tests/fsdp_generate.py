"""One rank of a 2-process gloo group generating with ``DiagnosisLoRA.generate_texts``, first unsharded, then with the
model sharded by ``healthai.sharding.shard_model`` (#30 item 3). Writes ``rankN.json`` to OUT_DIR: both answers, the
all-gathers FSDP made during each sharded call, the unit count, and whether every unit was sharded again with its
reshard-after-forward setting back. Run by tests/test_fsdp.py through the fork server's ``run_ranks``:

    python tests/fsdp_generate.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
from torch.distributed.tensor import DTensor

from healthai.fsdp_generation import reshards_after_forward
from healthai.generation import GenerationSettings
from healthai.model import DiagnosisLoRA
from healthai.sharding import is_sharded, shard_model
from healthai.val_generation import PendingPrompt, left_padded

NEW_TOKENS = 12


def prompts(rank: int) -> list[PendingPrompt]:
    """Two prompts of different lengths, different on each rank (each rank generates its own records)."""
    g = torch.Generator().manual_seed(rank)
    return [PendingPrompt(torch.randint(10, 5000, (n,), generator=g).tolist(), None, i, "")
            for i, n in enumerate((7 + rank, 4))]  # fmt: skip


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, constrained=False)
    # The new LoRA's A matrices come from torch's global generator: seeded, so that both ranks build the same adapter
    # whatever state the process they were forked from left it in (a sharded model is the ranks' halves put together).
    torch.manual_seed(0)
    module = DiagnosisLoRA(model_dir, dtype="float32", gradient_checkpointing=False, generation=settings,
                           merge_for_inference=False)  # fmt: skip
    module.configure_model()
    module.eval()
    with torch.no_grad():  # a trained adapter (B non-zero), the same on both ranks
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    ids, mask = left_padded(prompts(rank), module.tokenizer.pad_token_id, torch.device("cpu"))
    plain = module.generate_texts(ids, mask)

    shard_model(module.model, init_device_mesh("cpu", (2,)), "32-true")
    units = [m for m in module.model.modules() if is_sharded(m)]
    before = [reshards_after_forward(u) for u in units]
    gathers = []
    real = _fsdp_param_group.foreach_all_gather

    def counted(*args, **kwargs):
        gathers[-1] += 1
        return real(*args, **kwargs)

    _fsdp_param_group.foreach_all_gather = counted
    sharded = []
    for _ in range(2):  # two calls, as validation makes several
        gathers.append(0)
        sharded.append(module.generate_texts(ids, mask))
    resharded = all(isinstance(p, DTensor) for p in module.model.parameters())
    result = {"plain": plain, "sharded": sharded, "gathers": gathers, "units": len(units), "resharded": resharded,
              "settings_kept": [reshards_after_forward(u) for u in units] == before}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
