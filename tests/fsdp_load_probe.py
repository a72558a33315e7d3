"""One rank of a gloo process group loading a base under FSDP2 as fit does (:func:`healthai.sharded_load.build_sharded`
through ``DiagnosisLoRA``'s builders), measuring the rise of its peak host memory while it loads. Run by
tests/test_sharded_load.py on every rank (tests/forkserver.py's ``run_ranks``):

    python tests/fsdp_load_probe.py MODEL_DIR OUT_DIR

Saves, per rank, ``rank{N}.pt``: the peak-RSS rise in bytes, the local shard of one base weight and one LoRA A, RoPE's
``inv_freq`` and one number drawn after loading (the ranks' random state).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter: the size from which a block is its own mapping, returned to the system when freed."""


def memory_kb(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` figure of /proc/self/status, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from healthai.base_model import ALL_LINEAR, apply_lora, load_base, prepare_for_training
    from healthai.sharded_load import build_sharded

    model_dir, out = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    # glibc returns a freed block of 1 MB or more to the system at once (by default it raises that threshold to the
    # largest block freed, so the full tensors in flight, freed one by one, stay on its heap): the peak is then what
    # the rank holds, not what the allocator kept.
    ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
    before = memory_kb("VmRSS")

    def build(meta: bool):
        return apply_lora(load_base(model_dir, "bfloat16", "sdpa", meta=meta), None, 8, 16, 0.0, ALL_LINEAR)

    model = build_sharded(build, lambda m: prepare_for_training(m, False, mesh, "32-true", verbose=False),
                          torch.device("cpu"))  # fmt: skip
    rise = (memory_kb("VmHWM") - before) * 1024
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    torch.save({"rise": rise, "weight": layer.base_layer.weight.to_local().clone(),
                "lora_A": layer.lora_A["default"].weight.to_local().clone(),
                "inv_freq": model.get_base_model().model.rotary_emb.inv_freq.clone(), "draw": torch.rand(4)},
               out / f"rank{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
