"""What produced a file: cheap, stable fingerprints of base models, adapters and input files.

Used to refuse mixing work: an adapter applied to a base it was not trained on, or a predictions file resumed with
another input, adapter, prompt or decoding settings. Fingerprints are content hashes that stay cheap on a 15 GB
model: a base is identified by its ``config.json`` and, for each ``*.safetensors`` file, its size and a hash of its
header (tensor names, dtypes, shapes and byte offsets) and of its first and last MiB of tensor data. Two bases of the
same architecture with different weights therefore differ, without reading every weight.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Optional

SAMPLE_BYTES = 1 << 20
"""Bytes of tensor data hashed at each end of a safetensors file (beyond its header)."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a whole file (for inputs and adapters: small next to a base model)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _safetensors_digest(path: Path) -> str:
    """Hash of a safetensors file's size, header and first/last ``SAMPLE_BYTES`` of data (not the whole file)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        h.update(f.read(header_len))
        data_start = 8 + header_len
        h.update(f.read(SAMPLE_BYTES))
        if size - data_start > 2 * SAMPLE_BYTES:
            f.seek(size - SAMPLE_BYTES)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def resolve_model_dir(name_or_path: str) -> Optional[Path]:
    """The local folder of a base model: the path itself, else the hub cache's snapshot of that id (no download)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not a hub id, or not in the local cache: nothing local to fingerprint
        return None


def base_fingerprint(name_or_path: str) -> Optional[str]:
    """A fingerprint of a base model's config and weights, or ``None`` when no local copy can be found."""
    folder = resolve_model_dir(name_or_path)
    if folder is None or not (folder / "config.json").is_file():
        return None
    h = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    # Fields that only record which library version wrote the file do not change the model.
    for key in ("transformers_version", "_name_or_path"):
        config.pop(key, None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for shard in sorted(folder.glob("*.safetensors")):
        h.update(shard.name.encode())
        h.update(_safetensors_digest(shard).encode())
    return h.hexdigest()[:16]


def adapter_fingerprint(adapter_dir: str | Path) -> Optional[str]:
    """A fingerprint of an adapter folder's weights and LoRA config, or ``None`` for no adapter."""
    folder = Path(adapter_dir)
    if folder.is_file():  # a fit checkpoint (.ckpt) given as the adapter
        return sha256_file(folder)[:16]
    h = hashlib.sha256()
    files = [folder / "adapter_config.json", *sorted(folder.glob("adapter_model*.safetensors"))]
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()[:16]


def package_versions(*names: str) -> dict[str, Any]:
    """Installed versions of the named distributions (``None`` where absent), for provenance records."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
