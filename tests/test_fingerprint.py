"""Issue 17.2: the base fingerprint sees every byte of the weights, and stays cheap: a hub cache's blob names are used
as they are, and a local folder is hashed once (cached by size, modification time and inode)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from healthai import provenance
from healthai.provenance import HASH_CACHE_NAME, base_fingerprint


def make_base(folder: Path, seed: int = 0) -> Path:
    """A model folder: a config and one 4 MiB safetensors file (weights between the first and last MiB too)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}), encoding="utf-8")
    save_file({"w": torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed))}, str(folder / "model.safetensors"))
    return folder


def flip_middle_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        middle = path.stat().st_size // 2
        f.seek(middle)
        byte = f.read(1)
        f.seek(middle)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def hashes(monkeypatch, tmp_path):
    """Counts the files read whole for a digest; the user cache goes to a temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    calls: list[Path] = []
    real = provenance.sha256_file

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(provenance, "sha256_file", counting)
    return calls


def test_weights_differing_only_in_the_middle_give_different_fingerprints(tmp_path, hashes):
    a = make_base(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert base_fingerprint(str(a)) == base_fingerprint(str(b))  # a copy is the same base
    flip_middle_byte(b / "model.safetensors")  # far from the first and last MiB, the header unchanged
    assert base_fingerprint(str(a)) != base_fingerprint(str(b))


def test_a_digest_cache_copied_with_its_folder_is_not_trusted(tmp_path, hashes):
    a = make_base(tmp_path / "a")
    fingerprint = base_fingerprint(str(a))  # writes a's cache
    b = tmp_path / "b"
    shutil.copytree(a, b)  # copies the cache file and the weights' size and modification time (copy2)
    weights = b / "model.safetensors"
    stat = weights.stat()
    flip_middle_byte(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same name, size and mtime: only the inode differs
    assert (b / HASH_CACHE_NAME).is_file()
    assert base_fingerprint(str(b)) != fingerprint
    assert hashes == [a.resolve() / "model.safetensors", weights.resolve()]


def test_a_folder_is_hashed_once_and_again_after_a_change(tmp_path, hashes):
    base = make_base(tmp_path / "base")
    weights = base / "model.safetensors"
    first = base_fingerprint(str(base))
    assert hashes == [weights]
    cache = json.loads((base / HASH_CACHE_NAME).read_text(encoding="utf-8"))
    assert cache["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert base_fingerprint(str(base)) == first and hashes == [weights]  # the second call reads no weights
    stat = weights.stat()
    flip_middle_byte(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # as any write moves the mtime
    assert base_fingerprint(str(base)) != first and len(hashes) == 2
    assert base_fingerprint(str(base)) != first and len(hashes) == 2  # cached again


def test_a_read_only_folder_caches_in_the_user_cache(tmp_path, hashes, monkeypatch):
    base = make_base(tmp_path / "base")
    real_write = provenance._write_cache

    def read_only_beside(path, name, entry):
        if path.parent == base.resolve():
            raise PermissionError(f"{path}: read-only file system")
        real_write(path, name, entry)

    monkeypatch.setattr(provenance, "_write_cache", read_only_beside)
    first = base_fingerprint(str(base))
    assert not (base / HASH_CACHE_NAME).exists()
    assert list((tmp_path / "user-cache" / "healthai").glob("sha256-*.json"))
    assert base_fingerprint(str(base)) == first and len(hashes) == 1


def test_a_hub_cache_snapshot_uses_the_blob_names_without_reading(tmp_path, hashes):
    local = make_base(tmp_path / "local")
    # The hub cache layout: snapshots/<revision>/<file> -> ../../blobs/<sha256 of the content> for LFS files.
    repo = tmp_path / "hub" / "models--Qwen--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        content = (local / name).read_bytes()
        blob = repo / "blobs" / (hashlib.sha256(content).hexdigest() if name.endswith(".safetensors") else "a" * 40)
        blob.write_bytes(content)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    assert base_fingerprint(str(snapshot)) == base_fingerprint(str(local))  # same content, same fingerprint
    assert hashes == [local.resolve() / "model.safetensors"]  # only the local copy was read, never the blob
    assert not (repo / "blobs" / HASH_CACHE_NAME).exists()
