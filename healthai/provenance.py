"""What produced a file: stable fingerprints of base models and input files (an adapter's is
:attr:`healthai.adapter.Adapter.fingerprint`).

Used to refuse mixing work: an adapter applied to a base it was not trained on, or a predictions file resumed with
another input, adapter, prompt or decoding settings. Fingerprints are content hashes. A base is identified by its
``config.json`` and the SHA-256 of the whole content of each weight file, so two bases that differ in any byte of
their weights differ. That stays cheap on a 15 GB model because no weight file is read twice:

* in a Hugging Face hub cache the file is a symlink to ``blobs/<sha256>``: the hub names each weight blob by the
  SHA-256 of its content, which is used as it is (nothing is read);
* in a local folder each file is hashed once (~0.7 GB/s on one CPU core here: a 15 GB 7B in 20–25 s) and the
  digest is kept in ``.healthai-sha256.json`` beside the files — or, when the folder is read-only, in the user cache
  (``$XDG_CACHE_HOME/healthai`` or ``~/.cache/healthai``) — keyed by the file's name, size, modification time and
  inode. A file replaced or rewritten is hashed again; one rewritten in place with its old size and modification time
  restored (``touch -r``) is not noticed, nor a hub blob edited in place.

A local copy of a hub model and the hub cache's snapshot have the same fingerprint (both are SHA-256 of the content).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

from healthai.atomic import write_text

HASH_CACHE_NAME = ".healthai-sha256.json"
"""The file beside a model's weights that keeps their SHA-256 digests (see the module docstring)."""

_SHA256_NAME = re.compile(r"[0-9a-f]{64}")

LOUD_HASH_BYTES = 1 << 30
"""Files at least this large say that they are being hashed (once), so a pause at start-up is explained."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a whole file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hub_blob_sha256(path: Path) -> Optional[str]:
    """The SHA-256 a Hugging Face hub cache names a file's content by, without reading it, or None.

    A hub snapshot holds symlinks ``snapshots/<revision>/<file>`` → ``../../blobs/<name>``; a file stored with git LFS
    (every weight file) has the SHA-256 of its content as its blob name (small git files have a 40-hex git hash
    instead, which does not match here).
    """
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _SHA256_NAME.fullmatch(target.name) and target.is_file():
        return target.name
    return None


def _user_cache_file(folder: Path) -> Path:
    """The user-cache file of a folder whose own cache file cannot be written (a read-only model folder)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "healthai"
    return root / f"sha256-{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, unreadable or torn: hash again
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, name: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` under ``name`` to the cache file, atomically (a temporary file, then a rename); OSError when the
    folder cannot be written."""
    data = _read_cache(path)
    data[name] = entry
    write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def cached_sha256(path: str | Path) -> str:
    """SHA-256 of a file's whole content, hashed once per version of the file (see the module docstring).

    The digest is looked up beside the file (:data:`HASH_CACHE_NAME`), then in the user cache, under the file's name
    with its size, modification time (ns) and inode; on a miss the file is hashed and the digest written beside it,
    or to the user cache when its folder is read-only. A cache that cannot be written anywhere costs only speed.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    beside, user = path.parent / HASH_CACHE_NAME, _user_cache_file(path.parent)
    for cache in (beside, user):
        entry = _read_cache(cache).get(path.name)
        if isinstance(entry, dict) and {k: entry.get(k) for k in key} == key and entry.get("sha256"):
            return entry["sha256"]
    if stat.st_size >= LOUD_HASH_BYTES:
        print(f"hashing {path} ({stat.st_size / 1e9:.1f} GB) for the base fingerprint; once, then cached",
              file=sys.stderr, flush=True)  # fmt: skip
    digest = sha256_file(path)
    for cache in (beside, user):
        try:
            _write_cache(cache, path.name, {**key, "sha256": digest})
            break
        except OSError:
            continue
    return digest


def weight_sha256(path: Path) -> str:
    """SHA-256 of a weight file's whole content: the hub cache's blob name, else :func:`cached_sha256`."""
    return hub_blob_sha256(path) or cached_sha256(path)


def weight_files(folder: Path) -> list[Path]:
    """The weight files transformers loads from a model folder: its safetensors files, else its PyTorch ``.bin``."""
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


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
    """A fingerprint of a base model's config and the whole content of its weight files (:func:`weight_sha256`), or
    ``None`` when no local copy can be found."""
    folder = resolve_model_dir(name_or_path)
    if folder is None or not (folder / "config.json").is_file():
        return None
    h = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    # Fields that only record which library version wrote the file do not change the model.
    for key in ("transformers_version", "_name_or_path"):
        config.pop(key, None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for shard in weight_files(folder):
        h.update(shard.name.encode())
        h.update(weight_sha256(shard).encode())
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
