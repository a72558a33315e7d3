"""Two nodes on one machine (#32 item 2): ``torchrun --nnodes 2 --nproc_per_node 1`` twice on loopback (gloo, CPU),
as docs/multi-node.md launches a job, for a DDP fit, an FSDP fit and a DDP predict; each gives what one node gives
(the adapter of one process on the same global batches; every record predicted once, in input order). The DDP fit
runs the launch line itself; the FSDP fit and the predict fork the ranks torchrun would start, with the environment
it gives them, from the pre-imported interpreter (an interpreter start is 5-6 s here). Each "node" runs in its own
folder holding its own copy of the base at the same relative path, as machines with local disks do, while data,
checkpoints and predictions live in one shared folder: the base is hashed for its fingerprint on rank 0 only (#30
item 8), so node 1's copy never gets a hash cache beside it; a predict output folder the nodes do not share is refused.

One module, 2 optimizer steps, the small model."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO, labelled_records, read_jsonl, seed_records, write_jsonl
from test_fsdp import adapter_weights, fit_args

CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2",
       "--trainer.precision", "32-true"]  # fmt: skip
"""The options that turn a GPU overlay into its 2-node CPU smoke test (docs/multi-node.md)."""


DDP = ["--config", "configs/qwen_lora_ddp.yaml", *CPU, "--trainer.accumulate_grad_batches", "1"]
FSDP = ["--config", "configs/qwen_lora_fsdp.yaml", *CPU]
"""The overlays of the two fits, as docs/multi-node.md writes them (paths relative to the repository)."""


def absolute(args: list[str]) -> list[str]:
    """``args`` with each ``--config`` file made absolute: each node works in its own folder."""
    return [str(REPO / a) if i and args[i - 1] == "--config" else a for i, a in enumerate(args)]


def torchrun(node: int, port: int) -> list[str]:
    """The launch line of ``node`` of 2, one process each, rendezvous on loopback (docs/multi-node.md)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
            str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check(results: list[subprocess.CompletedProcess], status: int = 0) -> list[subprocess.CompletedProcess]:
    for node, result in enumerate(results):
        assert result.returncode == status, f"node {node}: " + result.stdout[-2000:] + result.stderr[-4000:]
    return results


def torchrun_two_nodes(nodes, args: list[str], timeout: float = 300) -> None:
    """``torchrun ... -m healthai *args`` on 2 nodes at once, each in its own folder: the launch line itself."""
    # TMPDIR: each agent's log folder (torchelastic_*) goes with the test's, not into /tmp for good.
    port, env = free_port(), dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TMPDIR=str(nodes[0].parent))
    procs = [subprocess.Popen([*torchrun(node, port), "-m", "healthai", *args], cwd=folder, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node, folder in enumerate(nodes)]  # fmt: skip
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    check(results)


def forked_two_nodes(forkserver, nodes, args: list[str], timeout: float = 300,
                     status: int = 0) -> list[subprocess.CompletedProcess]:  # fmt: skip
    """The processes torchrun's agents would start for ``-m healthai *args``, with the environment they give their
    worker (what Lightning's ``TorchElasticEnvironment`` reads), forked from the pre-imported interpreter instead of
    two agents and two fresh interpreters (tests/forkserver.py): the same ranks, seconds of imports fewer."""
    port, children = free_port(), []
    for node, folder in enumerate(nodes):
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), RANK=str(node), GROUP_RANK=str(node), ROLE_RANK=str(node), LOCAL_RANK="0",
                   LOCAL_WORLD_SIZE="1", WORLD_SIZE="2", GROUP_WORLD_SIZE="2", ROLE_WORLD_SIZE="2",
                   TORCHELASTIC_RUN_ID="none", TORCHELASTIC_RESTART_COUNT="0",
                   TORCHELASTIC_MAX_RESTARTS="0")  # fmt: skip
        out, err = folder / f"stdout-{len(children)}", folder / f"stderr-{len(children)}"
        children.append((forkserver.start(["-m", "healthai", *args], env=env, cwd=folder, stdout=out,
                                          stderr=err), out, err))  # fmt: skip
    try:
        for child, _, _ in children:
            child.wait(timeout)
    finally:
        for child, _, _ in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return check([subprocess.CompletedProcess(c.args, c.poll(), o.read_text(), e.read_text()) for c, o, e in children],
                 status)  # fmt: skip


@pytest.mark.slow
def test_two_torchrun_nodes_fit_ddp_and_fsdp_and_predict_as_one_node(tmp_path, tiny_model_dir, monkeypatch,
                                                                     forkserver):  # fmt: skip
    from healthai.cli import cli_main
    from healthai.provenance import HASH_CACHE_NAME

    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:  # each node's local copy of the base, never hashed yet
        shutil.copytree(tiny_model_dir, node / "base", ignore=shutil.ignore_patterns(HASH_CACHE_NAME))
    shared = tmp_path / "shared"
    train = write_jsonl(shared / "train.jsonl", labelled_records(8))
    val = write_jsonl(shared / "val.jsonl", labelled_records(2, offset=20))
    # 2 nodes x batch 2 = one process x batch 4 (the samplers build the same global batches); 2 steps.
    for name, overlay, launch in (("ddp", DDP, torchrun_two_nodes), ("fsdp", FSDP, forked_two_nodes)):
        # The documented line (the test below), then the test's own sizes and folders.
        args = [*absolute(fit_args(shared, "base", train, val, name, 2, 2, overlay)), "--model.generate_every_n_epochs",
                "0"]  # fmt: skip
        launch(nodes, args) if launch is torchrun_two_nodes else launch(forkserver, nodes, args)
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        cli_main(fit_args(shared, str(tiny_model_dir), train, val, "plain", 4, 2,
                          ["--model.generate_every_n_epochs", "0"]))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    plain = adapter_weights(shared / "plain" / "tiny" / "version_0" / "adapter")
    assert sum(float(v.abs().sum()) for k, v in plain.items() if "lora_B" in k) > 0  # the steps trained
    for name in ("ddp", "fsdp"):
        got = adapter_weights(shared / name / "tiny" / "version_0" / "adapter")
        assert got.keys() == plain.keys(), name
        for key in plain:
            assert got[key].shape == plain[key].shape, (name, key)
            assert torch.allclose(got[key], plain[key], rtol=1e-4, atol=1e-6), (name, key)

    # DDP predict on the 2 nodes, shards on the shared folder: every record once, in input order.
    records = write_jsonl(shared / "records.jsonl", seed_records(5, offset=40))
    predict = ["predict", "--config", str(REPO / "configs/predict_tiny.yaml"), "--model.adapter_path",
               str(shared / "ddp/tiny/version_0/adapter"), "--data.predict_file", str(records),
               "--data.eval_batch_size", "2", "--writer.progress", "false", "--model.generation.max_new_tokens",
               "24"]  # fmt: skip
    on_nodes = [*predict, "--trainer.strategy", "ddp", *CPU, "--model.model_name_or_path", "base"]
    forked_two_nodes(forkserver, nodes, [*on_nodes, "--writer.output_path", str(shared / "pred.jsonl")])
    rows = read_jsonl(shared / "pred.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in read_jsonl(records)]  # each once, merged in input order
    assert not list(shared.glob("pred.jsonl.rank*"))  # rank 0 merged both nodes' shards from the shared folder

    # An output folder of the same path on each node's own disk: refused at start on both nodes, in one line (rank 0
    # would merge its own node's shards only).
    refused = forked_two_nodes(forkserver, nodes, [*on_nodes, "--writer.output_path", "local/pred.jsonl"], status=2)
    for result in refused:
        assert result.stderr.strip().splitlines()[-1].endswith(
            "--writer.output_path local: 1 of 2 processes cannot see this folder (a file written there by rank 0 is "
            "missing on their node): put it on a filesystem every node shares, where rank 0 can merge every rank's "
            "shard"), result.stderr[-2000:]  # fmt: skip
    assert not list((nodes[0] / "local").iterdir())  # rank 0's marker removed, nothing predicted

    # The fingerprint was computed once per job, by rank 0 on node 0: node 1's copy was never hashed.
    assert (nodes[0] / "base" / HASH_CACHE_NAME).is_file()
    assert not (nodes[1] / "base" / HASH_CACHE_NAME).exists()


def test_the_documented_two_node_line_is_the_one_this_module_runs():
    # docs/multi-node.md's CPU block: node 0's torchrun line, word for word what the DDP fit above launches (up to
    # the sizes and folders that are the test's own).
    page = (REPO / "docs" / "multi-node.md").read_text(encoding="utf-8")
    block = page.split("what `tests/test_multi_node.py`")[1].split("```bash\n")[1].split("```")[0]
    lines = [line.rstrip("\\ ") for line in block.splitlines() if not line.lstrip().startswith("#")]
    documented = shlex.split(" ".join(lines))
    fit = fit_args(REPO, "base", "T", "V", "ddp", 2, 2, DDP)
    fit = fit[: fit.index("--model.model_name_or_path") + 2]
    assert documented == ["torchrun", *torchrun(0, 29500)[3:], "-m", "healthai", *fit]
